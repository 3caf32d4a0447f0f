//! Pictures for people to look at: PNG images (montages of volumes and labels) and, alongside, SVG
//! charts. Nothing here depends on a plotting crate, so the bytes depend only on the input.

// ================================================================================================
// PNG images
// ================================================================================================

use std::path::Path;

/// Errors writing a PNG image.
#[derive(Debug, thiserror::Error)]
pub enum PngError {
    #[error("cannot encode a {width}×{height} PNG: {source}")]
    Encode {
        width: usize,
        height: usize,
        #[source]
        source: png::EncodingError,
    },
    #[error("cannot write PNG {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// An 8-bit RGB raster, rows top to bottom, pixels left to right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `3 * width * height` bytes, R G B per pixel.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// An image filled with one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let mut pixels = Vec::with_capacity(3 * width * height);
        for _ in 0..width * height {
            pixels.extend_from_slice(&rgb);
        }
        RgbImage {
            width,
            height,
            pixels,
        }
    }

    /// The colour at (x, y).
    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        let o = 3 * (y * self.width + x);
        [self.pixels[o], self.pixels[o + 1], self.pixels[o + 2]]
    }

    /// Sets the colour at (x, y); pixels outside the image are ignored.
    pub fn put(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < self.width && y < self.height {
            let o = 3 * (y * self.width + x);
            self.pixels[o..o + 3].copy_from_slice(&rgb);
        }
    }

    /// Copies `other` with its top-left corner at (x0, y0), clipping at the edges.
    pub fn blit(&mut self, other: &RgbImage, x0: usize, y0: usize) {
        for y in 0..other.height {
            for x in 0..other.width {
                self.put(x0 + x, y0 + y, other.get(x, y));
            }
        }
    }

    /// The image as PNG bytes (8-bit RGB, no metadata chunks, so equal pixels give equal bytes).
    pub fn encode_png(&self) -> Result<Vec<u8>, PngError> {
        let enc_err = |source| PngError::Encode {
            width: self.width,
            height: self.height,
            source,
        };
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            encoder.set_compression(png::Compression::Default);
            let mut writer = encoder.write_header().map_err(enc_err)?;
            writer.write_image_data(&self.pixels).map_err(enc_err)?;
            writer.finish().map_err(enc_err)?;
        }
        Ok(out)
    }

    /// Writes the image as a PNG file.
    pub fn write_png(&self, path: impl AsRef<Path>) -> Result<(), PngError> {
        let path = path.as_ref();
        let bytes = self.encode_png()?;
        std::fs::write(path, bytes).map_err(|source| PngError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod png_tests {
    use super::*;

    #[test]
    fn png_round_trips_pixels() {
        let mut img = RgbImage::filled(7, 5, [10, 20, 30]);
        img.put(6, 4, [255, 0, 128]);
        let small = RgbImage::filled(2, 2, [1, 2, 3]);
        img.blit(&small, 6, 0); // clipped at the right edge
        let bytes = img.encode_png().unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (7, 5));
        assert_eq!(&buf[..info.buffer_size()], &img.pixels[..]);
        assert_eq!(img.get(6, 0), [1, 2, 3]);
        assert_eq!(img.get(6, 4), [255, 0, 128]);
    }
}
