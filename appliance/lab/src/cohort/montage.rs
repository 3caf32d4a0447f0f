//! Per-hospital montages: for each of the first patients, the axial slice with the most tumour,
//! shown twice side by side: the grey image alone, and with the labels as a coloured overlay
//! (tumour labels also outlined). One pixel per millimetre, anterior at the top, the patient's
//! right on the picture's right (neurological convention).

use cosilo_sdk::volume::Volume;

use super::anatomy::percentile;
use super::labels::{is_tumour, BACKGROUND, NUM_LABELS};
use crate::plot::RgbImage;

/// Patients shown per montage.
pub const MAX_TILES: usize = 16;
/// Tiles per montage row.
pub const COLUMNS: usize = 4;
const GAP: usize = 2;
const BORDER: usize = 6;
const SEPARATOR: [u8; 3] = [48, 48, 48];

/// Overlay colour of each label.
pub const COLOURS: [[u8; 3]; NUM_LABELS] = [
    [0, 0, 0],
    [60, 120, 255],
    [40, 200, 80],
    [240, 240, 200],
    [255, 215, 0],
    [255, 40, 40],
    [180, 60, 255],
];

/// The axial slice (k) with the most tumour voxels; the middle slice when there is no tumour.
pub fn tumour_slice(labels: &Volume<u8>) -> usize {
    let [nx, ny, nz] = labels.geometry.dims;
    let mut best = (nz / 2, 0usize);
    for k in 0..nz {
        let n = labels.data[k * nx * ny..(k + 1) * nx * ny]
            .iter()
            .filter(|&&l| is_tumour(l))
            .count();
        if n > best.1 {
            best = (k, n);
        }
    }
    best.0
}

/// Size in pixels of one panel for a grid (1 px per mm in-plane).
fn panel_size(labels: &Volume<u8>) -> (usize, usize) {
    let sp = labels.geometry.spacing();
    let [nx, ny, _] = labels.geometry.dims;
    (
        (nx as f64 * sp[0]).round().max(1.0) as usize,
        (ny as f64 * sp[1]).round().max(1.0) as usize,
    )
}

/// Size in pixels of one patient's tile (two panels).
pub fn tile_size(labels: &Volume<u8>) -> (usize, usize) {
    let (w, h) = panel_size(labels);
    (2 * w + GAP, h)
}

/// Renders one patient's tile: grey image | image with label overlay, at the tumour's slice.
pub fn render_tile(image: &Volume<f32>, labels: &Volume<u8>) -> RgbImage {
    let [nx, ny, _] = labels.geometry.dims;
    let sp = labels.geometry.spacing();
    let k = tumour_slice(labels);
    let brain: Vec<f32> = image
        .data
        .iter()
        .zip(&labels.data)
        .filter(|(_, &l)| l != BACKGROUND)
        .map(|(&v, _)| v)
        .collect();
    let lo = percentile(&brain, 0.005);
    let hi = percentile(&brain, 0.995).max(lo + 1e-6);
    let img = image.axial_slice(k);
    let lab = labels.axial_slice(k);
    let (pw, ph) = panel_size(labels);
    let mut tile = RgbImage::filled(2 * pw + GAP, ph, SEPARATOR);
    let label_at = |i: isize, j: isize| {
        if i < 0 || j < 0 || i >= nx as isize || j >= ny as isize {
            BACKGROUND
        } else {
            lab[i as usize + nx * j as usize]
        }
    };
    for y in 0..ph {
        // Anterior (high j) at the top.
        let j = ((ph - 1 - y) as f64 / sp[1]).floor().min((ny - 1) as f64) as usize;
        for x in 0..pw {
            let i = (x as f64 / sp[0]).floor().min((nx - 1) as f64) as usize;
            let v = img[i + nx * j];
            let l = lab[i + nx * j];
            let grey = if l == BACKGROUND && v == 0.0 {
                0u8
            } else {
                (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8
            };
            tile.put(x, y, [grey; 3]);
            let mut rgb = [grey; 3];
            if l != BACKGROUND {
                let alpha = if is_tumour(l) { 0.5 } else { 0.3 };
                let c = COLOURS[l as usize];
                for (o, &cc) in rgb.iter_mut().zip(&c) {
                    *o = (*o as f32 * (1.0 - alpha) + cc as f32 * alpha).round() as u8;
                }
                let (ii, jj) = (i as isize, j as isize);
                let edge = [(-1, 0), (1, 0), (0, -1), (0, 1)]
                    .iter()
                    .any(|(di, dj)| label_at(ii + di, jj + dj) != l);
                if is_tumour(l) && edge {
                    rgb = c;
                }
            }
            tile.put(pw + GAP + x, y, rgb);
        }
    }
    tile
}

/// Lays tiles out in rows of [`COLUMNS`] with a border; tiles of one hospital share a size.
pub fn assemble(tiles: &[RgbImage]) -> RgbImage {
    let (tw, th) = tiles
        .iter()
        .fold((1, 1), |(w, h), t| (w.max(t.width), h.max(t.height)));
    let cols = tiles.len().clamp(1, COLUMNS);
    let rows = tiles.len().div_ceil(COLUMNS).max(1);
    let (w, h) = montage_size((tw, th), tiles.len());
    debug_assert_eq!(
        (w, h),
        (BORDER + cols * (tw + BORDER), BORDER + rows * (th + BORDER))
    );
    let mut out = RgbImage::filled(w, h, SEPARATOR);
    for (n, t) in tiles.iter().enumerate() {
        let (c, r) = (n % COLUMNS, n / COLUMNS);
        out.blit(t, BORDER + c * (tw + BORDER), BORDER + r * (th + BORDER));
    }
    out
}

/// Pixel size of a montage of `n` tiles of size `tile`.
pub fn montage_size(tile: (usize, usize), n: usize) -> (usize, usize) {
    let cols = n.clamp(1, COLUMNS);
    let rows = n.div_ceil(COLUMNS).max(1);
    (
        BORDER + cols * (tile.0 + BORDER),
        BORDER + rows * (tile.1 + BORDER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cohort::patient::{simulate, tests::ball_subject};
    use cosilo_rng::Rng;

    #[test]
    fn montage_png_decodes_with_the_expected_size() {
        let s = ball_subject();
        let tiles: Vec<RgbImage> = (0..5)
            .map(|i| {
                let p = simulate(&s, &mut Rng::derive(1, i));
                render_tile(&p.image, &p.labels)
            })
            .collect();
        let tile = tile_size(&s.labels);
        assert_eq!((tiles[0].width, tiles[0].height), tile);
        let m = assemble(&tiles);
        let bytes = m.encode_png().unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        let want = montage_size(tile, 5);
        assert_eq!((info.width as usize, info.height as usize), want);
        assert_eq!(want, (6 + 4 * (tile.0 + 6), 6 + 2 * (tile.1 + 6)));
        // Some tumour colour made it into the picture.
        assert!(buf.chunks(3).any(|p| p == COLOURS[5]));
    }
}
