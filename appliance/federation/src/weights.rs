//! Model parameters as one flat `f32` vector, and the formats they travel in.
//!
//! The training crate flattens a model's parameters into a [`FlatWeights`] (this crate knows
//! nothing of candle): a [`Layout`] (every variable's name and shape, sorted by name, so two appliances
//! built from the same configuration agree byte for byte) and the values concatenated in that
//! order. Both sides compare [`Layout::digest`] before using a peer's weights. On the wire the
//! values take one of three [`WeightFormat`]s: raw little-endian `f32`, `f16` (half the bytes,
//! relative error at most 2⁻¹¹ for normal values), or `f16` compressed with zstd. Decoding is
//! strict: the exact length for the layout, finite values only, and a decompression cap at the
//! layout's size so a forged frame cannot inflate without bound.

use std::fmt;
use std::io::Read;
use std::str::FromStr;

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The zstd level used for [`WeightFormat::F16Zstd`] (fast; weights barely compress harder).
pub const ZSTD_LEVEL: i32 = 3;

/// Values converted per block when streaming `f16` data (16 KiB of `f32`, stays in L1).
pub(crate) const BLOCK: usize = 4096;

/// A failed operation on flat weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The weights were made for a different model architecture.
    #[error("layout mismatch: {0}")]
    LayoutMismatch(String),
    /// `data` does not hold `layout.numel()` values.
    #[error("weights hold {actual} values but their layout needs {expected}")]
    DataLength {
        /// Values the layout needs.
        expected: usize,
        /// Values present.
        actual: usize,
    },
    /// An encoded payload has the wrong number of bytes for the layout.
    #[error("{format} payload is {actual} bytes, the layout needs {expected}")]
    WrongLength {
        /// The payload's format.
        format: WeightFormat,
        /// Bytes the layout needs (decompressed, for zstd).
        expected: usize,
        /// Bytes found.
        actual: usize,
    },
    /// A decompressed payload exceeds the layout's size (a zstd bomb or a different model).
    #[error("decompressed payload exceeds the layout's {limit} bytes")]
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// A value is NaN or infinite.
    #[error("value {index} is not finite ({value})")]
    NonFinite {
        /// Position in the flat vector.
        index: usize,
        /// The value.
        value: f32,
    },
    /// zstd refused the payload.
    #[error("zstd decompression failed: {0}")]
    Decompress(std::io::Error),
    /// An unknown format name (config) or code (wire).
    #[error("unknown weight format {0:?} (expected f32, f16 or f16+zstd)")]
    UnknownFormat(String),
}

/// How weights are encoded in an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WeightFormat {
    /// Little-endian IEEE `f32`, 4 bytes per value, exact.
    #[serde(rename = "f32")]
    F32,
    /// Little-endian IEEE `f16`, 2 bytes per value (round to nearest even).
    #[serde(rename = "f16")]
    F16,
    /// The `f16` bytes compressed as one or more zstd frames.
    #[serde(rename = "f16+zstd")]
    F16Zstd,
}

impl WeightFormat {
    /// Every format, in wire-code order.
    pub const ALL: [WeightFormat; 3] =
        [WeightFormat::F32, WeightFormat::F16, WeightFormat::F16Zstd];

    /// The one-byte code used in the wire format (0, 1, 2).
    pub fn code(self) -> u8 {
        match self {
            WeightFormat::F32 => 0,
            WeightFormat::F16 => 1,
            WeightFormat::F16Zstd => 2,
        }
    }

    /// The format for a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.code() == code)
    }

    /// The config name (`f32`, `f16`, `f16+zstd`).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::F16Zstd => "f16+zstd",
        }
    }

    /// Bytes per value before compression.
    pub fn value_bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::F16 | WeightFormat::F16Zstd => 2,
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightFormat {
    type Err = WeightsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| WeightsError::UnknownFormat(s.to_string()))
    }
}

/// The names and shapes of a model's variables, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Layout {
    /// `(name, shape)` for every variable, in the order their values are concatenated.
    pub tensors: Vec<(String, Vec<usize>)>,
}

impl Layout {
    /// Total number of values.
    pub fn numel(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// SHA-256 over every name and shape (length-prefixed, little-endian `u64`s), so two sides can
    /// check in 32 bytes that they run the same architecture.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"cosilo-layout-v1");
        h.update((self.tensors.len() as u64).to_le_bytes());
        for (name, shape) in &self.tensors {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((shape.len() as u64).to_le_bytes());
            for d in shape {
                h.update((*d as u64).to_le_bytes());
            }
        }
        h.finalize().into()
    }

    /// Bytes of the encoded payload before compression (`numel × value_bytes`).
    pub fn raw_len(&self, format: WeightFormat) -> usize {
        self.numel().saturating_mul(format.value_bytes())
    }
}

/// A model's parameters flattened: values of `layout`'s tensors concatenated in order.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatWeights {
    /// Names and shapes.
    pub layout: Layout,
    /// `layout.numel()` values.
    pub data: Vec<f32>,
}

impl FlatWeights {
    /// Checks that `data` has exactly `layout.numel()` values.
    pub fn check_len(&self) -> Result<(), WeightsError> {
        let expected = self.layout.numel();
        if self.data.len() != expected {
            return Err(WeightsError::DataLength {
                expected,
                actual: self.data.len(),
            });
        }
        Ok(())
    }

    /// Encodes the values (not the layout: the receiver knows it and checks its digest).
    /// Values beyond `f16`'s range (±65504) become infinite in the `f16` formats, which receivers
    /// refuse; [`FlatWeights::check_encodable`] tells the sender first.
    pub fn encode(&self, format: WeightFormat) -> Vec<u8> {
        encode_values(&self.data, format)
    }

    /// Checks that every value survives `format` as a finite number.
    pub fn check_encodable(&self, format: WeightFormat) -> Result<(), WeightsError> {
        for (index, &value) in self.data.iter().enumerate() {
            let ok = match format {
                WeightFormat::F32 => value.is_finite(),
                _ => f16::from_f32(value).is_finite(),
            };
            if !ok {
                return Err(WeightsError::NonFinite { index, value });
            }
        }
        Ok(())
    }

    /// Decodes a payload made by [`FlatWeights::encode`] for `layout`: refuses a wrong length,
    /// NaN or infinite values, and zstd output beyond the layout's size.
    pub fn decode(
        bytes: &[u8],
        format: WeightFormat,
        layout: &Layout,
    ) -> Result<FlatWeights, WeightsError> {
        let n = layout.numel();
        let mut data = Vec::with_capacity(n);
        for_each_block(bytes, format, n, |_, block| {
            data.extend_from_slice(block);
            Ok(())
        })?;
        Ok(FlatWeights {
            layout: layout.clone(),
            data,
        })
    }
}

/// A model's values as they travel: encoded in a [`WeightFormat`], checked when made from
/// received bytes, and decoded block by block only where they are used (an average streams them
/// with [`crate::aggregate::WeightedAverage::add_encoded`]), so a strategy that holds a peer's
/// model holds its wire size (`f16+zstd`: about half of the `f32` model or less), not its `f32`
/// values. Cloning shares the bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedWeights {
    format: WeightFormat,
    /// Number of values encoded.
    len: usize,
    bytes: std::sync::Arc<Vec<u8>>,
}

impl EncodedWeights {
    /// Takes received `bytes` that should hold `len` values in `format`, after checking them
    /// completely (length, finite values, the zstd cap) in one streaming pass that allocates no
    /// model-sized buffer: the same checks as [`FlatWeights::decode`].
    pub fn check(bytes: Vec<u8>, format: WeightFormat, len: usize) -> Result<Self, WeightsError> {
        for_each_block(&bytes, format, len, |_, _| Ok(()))?;
        Ok(EncodedWeights {
            format,
            len,
            bytes: std::sync::Arc::new(bytes),
        })
    }

    /// Encodes `values` in `format` and checks that every value survives it as a finite number
    /// (values beyond `f16`'s range do not).
    pub fn encode(values: &[f32], format: WeightFormat) -> Result<Self, WeightsError> {
        Self::check(encode_values(values, format), format, values.len())
    }

    /// Encodes `values` in `format` and, in the same pass, replaces each value by what a receiver
    /// decodes (`f16` rounding; `f32` is unchanged), so a sender can use the very numbers its
    /// peers use without decoding its own payload again. Refuses a value that does not survive
    /// `format` as a finite number, leaving `values` partly rounded.
    pub fn encode_as_sent(values: &mut [f32], format: WeightFormat) -> Result<Self, WeightsError> {
        let len = values.len();
        let bytes = match format {
            WeightFormat::F32 => encode_values(values, format),
            WeightFormat::F16 | WeightFormat::F16Zstd => {
                let mut out = Vec::with_capacity(len * 2);
                let mut buf = vec![f16::ZERO; BLOCK.min(len)];
                for (i, chunk) in values.chunks_mut(BLOCK).enumerate() {
                    let b = &mut buf[..chunk.len()];
                    b.convert_from_f32_slice(chunk);
                    for h in b.iter() {
                        out.extend_from_slice(&h.to_bits().to_le_bytes());
                    }
                    b.convert_to_f32_slice(chunk);
                    check_finite(i * BLOCK, chunk)?;
                }
                if format == WeightFormat::F16Zstd {
                    compress(&out)
                } else {
                    out
                }
            }
        };
        Ok(EncodedWeights {
            format,
            len,
            bytes: std::sync::Arc::new(bytes),
        })
    }

    /// The format the bytes are in.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a model of no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The encoded bytes (what goes on the wire).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The values (checked again while decoding).
    pub fn decode(&self) -> Result<Vec<f32>, WeightsError> {
        let mut data = Vec::with_capacity(self.len);
        for_each_block(&self.bytes, self.format, self.len, |_, block| {
            data.extend_from_slice(block);
            Ok(())
        })?;
        Ok(data)
    }
}

/// Encodes raw values in `format` (see [`FlatWeights::encode`]).
pub fn encode_values(values: &[f32], format: WeightFormat) -> Vec<u8> {
    match format {
        WeightFormat::F32 => {
            let mut out = Vec::with_capacity(values.len() * 4);
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out
        }
        WeightFormat::F16 => f16_bytes(values),
        WeightFormat::F16Zstd => compress(&f16_bytes(values)),
    }
}

/// `raw` compressed as one zstd frame at [`ZSTD_LEVEL`].
fn compress(raw: &[u8]) -> Vec<u8> {
    // Compressing an in-memory buffer into a Vec cannot fail except on allocation.
    zstd::bulk::compress(raw, ZSTD_LEVEL)
        .unwrap_or_else(|e| panic!("zstd failed compressing {} bytes in memory: {e}", raw.len()))
}

fn f16_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 2);
    let mut buf = vec![f16::ZERO; BLOCK.min(values.len())];
    for chunk in values.chunks(BLOCK) {
        let b = &mut buf[..chunk.len()];
        b.convert_from_f32_slice(chunk);
        for h in b.iter() {
            out.extend_from_slice(&h.to_bits().to_le_bytes());
        }
    }
    out
}

/// Checks that a block of decoded values is finite; `start` is the block's offset.
fn check_finite(start: usize, block: &[f32]) -> Result<(), WeightsError> {
    // A branch-free scan first (vectorises), the position only on failure.
    if block.iter().fold(true, |ok, v| ok & v.is_finite()) {
        return Ok(());
    }
    let (i, &value) = block
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
        .unwrap_or((0, &0.0));
    Err(WeightsError::NonFinite {
        index: start + i,
        value,
    })
}

/// Streams the decoded values of a payload in blocks of at most [`BLOCK`] values, calling
/// `f(offset, block)`; each block is checked finite before `f` sees it, and the total must be
/// exactly `n` values. Memory: one block buffer (plus zstd's window, capped at the payload size).
pub(crate) fn for_each_block(
    bytes: &[u8],
    format: WeightFormat,
    n: usize,
    mut f: impl FnMut(usize, &[f32]) -> Result<(), WeightsError>,
) -> Result<(), WeightsError> {
    let expected = n.saturating_mul(format.value_bytes());
    let mut block = vec![0f32; BLOCK.min(n.max(1))];
    match format {
        WeightFormat::F32 => {
            if bytes.len() != expected {
                return Err(WeightsError::WrongLength {
                    format,
                    expected,
                    actual: bytes.len(),
                });
            }
            for (i, chunk) in bytes.chunks(BLOCK * 4).enumerate() {
                let b = &mut block[..chunk.len() / 4];
                for (v, c) in b.iter_mut().zip(chunk.chunks_exact(4)) {
                    *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                check_finite(i * BLOCK, b)?;
                f(i * BLOCK, b)?;
            }
        }
        WeightFormat::F16 => {
            if bytes.len() != expected {
                return Err(WeightsError::WrongLength {
                    format,
                    expected,
                    actual: bytes.len(),
                });
            }
            f16_blocks(bytes, &mut block, &mut f)?;
        }
        WeightFormat::F16Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(bytes)
                .map_err(WeightsError::Decompress)?;
            // Refuse frames that ask for a window larger than the whole payload.
            let log = (usize::BITS - expected.max(1024).leading_zeros()).clamp(10, 31);
            dec.window_log_max(log).map_err(WeightsError::Decompress)?;
            let mut raw = vec![0u8; BLOCK * 2];
            let mut done = 0usize;
            loop {
                let filled = read_full(&mut dec, &mut raw).map_err(WeightsError::Decompress)?;
                if filled == 0 {
                    break;
                }
                if done + filled > expected {
                    return Err(WeightsError::TooLarge { limit: expected });
                }
                if filled % 2 != 0 {
                    return Err(WeightsError::WrongLength {
                        format,
                        expected,
                        actual: done + filled,
                    });
                }
                let start = done / 2;
                let b = &mut block[..filled / 2];
                decode_f16_into(&raw[..filled], b);
                check_finite(start, b)?;
                f(start, b)?;
                done += filled;
            }
            if done != expected {
                return Err(WeightsError::WrongLength {
                    format,
                    expected,
                    actual: done,
                });
            }
        }
    }
    Ok(())
}

fn f16_blocks(
    bytes: &[u8],
    block: &mut [f32],
    f: &mut impl FnMut(usize, &[f32]) -> Result<(), WeightsError>,
) -> Result<(), WeightsError> {
    for (i, chunk) in bytes.chunks(BLOCK * 2).enumerate() {
        let b = &mut block[..chunk.len() / 2];
        decode_f16_into(chunk, b);
        check_finite(i * BLOCK, b)?;
        f(i * BLOCK, b)?;
    }
    Ok(())
}

/// Converts little-endian `f16` bytes (`2 × out.len()` of them) to `f32` (F16C when available).
fn decode_f16_into(bytes: &[u8], out: &mut [f32]) {
    let mut halves = [f16::ZERO; BLOCK];
    for (hs, (bs, os)) in halves
        .chunks_mut(BLOCK)
        .zip(bytes.chunks(BLOCK * 2).zip(out.chunks_mut(BLOCK)))
    {
        let hs = &mut hs[..os.len()];
        for (h, c) in hs.iter_mut().zip(bs.chunks_exact(2)) {
            *h = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
        }
        hs.convert_to_f32_slice(os);
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cosilo_rng::Rng;

    fn layout(shapes: &[(&str, &[usize])]) -> Layout {
        Layout {
            tensors: shapes
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_vec()))
                .collect(),
        }
    }

    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    fn flat(seed: u64) -> FlatWeights {
        let layout = layout(&[("a.weight", &[16, 3, 3, 3]), ("a.bias", &[16]), ("z", &[7])]);
        let data = random(layout.numel(), seed, 0.5);
        FlatWeights { layout, data }
    }

    #[test]
    fn formats_parse_and_serialise_by_their_config_names() {
        for f in WeightFormat::ALL {
            assert_eq!(f.name().parse::<WeightFormat>().unwrap(), f);
            assert_eq!(WeightFormat::from_code(f.code()), Some(f));
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
        }
        assert!("f64".parse::<WeightFormat>().is_err());
        assert_eq!(WeightFormat::from_code(3), None);
    }

    #[test]
    fn digest_depends_on_names_and_shapes() {
        let a = layout(&[("x", &[2, 3])]);
        let b = layout(&[("x", &[3, 2])]);
        let c = layout(&[("y", &[2, 3])]);
        let d = layout(&[("x", &[2, 3]), ("y", &[1])]);
        let digests = [a.digest(), b.digest(), c.digest(), d.digest()];
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(i == j, digests[i] == digests[j]);
            }
        }
        assert_eq!(a.digest(), a.clone().digest());
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let w = flat(1);
        let bytes = w.encode(WeightFormat::F32);
        assert_eq!(bytes.len(), w.layout.numel() * 4);
        let back = FlatWeights::decode(&bytes, WeightFormat::F32, &w.layout).unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn f16_round_trips_within_half_precision() {
        let mut w = flat(2);
        // Spread magnitudes across many binades, including tiny (subnormal in f16) values.
        for (i, v) in w.data.iter_mut().enumerate() {
            *v *= 10f32.powi((i % 9) as i32 - 6);
        }
        for fmt in [WeightFormat::F16, WeightFormat::F16Zstd] {
            let bytes = w.encode(fmt);
            let back = FlatWeights::decode(&bytes, fmt, &w.layout).unwrap();
            assert_eq!(back.layout, w.layout);
            for (a, b) in w.data.iter().zip(&back.data) {
                // Normal f16: relative 2^-11; subnormal: absolute half of 2^-24.
                let bound = (a.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
                assert!((a - b).abs() <= bound, "{fmt}: {a} -> {b}");
            }
        }
        assert_eq!(w.encode(WeightFormat::F16).len(), w.layout.numel() * 2);
    }

    #[test]
    fn encoding_as_sent_gives_the_values_a_receiver_decodes() {
        // Values across many binades (f16 subnormals included), an odd length that ends inside
        // a block, and more than one block.
        let mut values = random(2 * BLOCK + 1001, 7, 0.5);
        for (i, v) in values.iter_mut().enumerate() {
            *v *= 10f32.powi((i % 9) as i32 - 6);
        }
        for fmt in WeightFormat::ALL {
            let mut as_sent = values.clone();
            let enc = EncodedWeights::encode_as_sent(&mut as_sent, fmt).unwrap();
            assert_eq!(enc.bytes(), encode_values(&values, fmt).as_slice(), "{fmt}");
            assert_eq!((enc.len(), enc.format()), (values.len(), fmt));
            let layout = layout(&[("v", &[values.len()])]);
            let received = FlatWeights::decode(enc.bytes(), fmt, &layout).unwrap().data;
            // Bit for bit, so that sender and receivers average the very same numbers.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&as_sent), bits(&received), "{fmt}");
            assert_eq!(bits(&enc.decode().unwrap()), bits(&received), "{fmt}");
            if fmt != WeightFormat::F32 {
                assert_ne!(bits(&as_sent), bits(&values), "{fmt} rounded nothing");
            }
        }
        // A value beyond f16's range is refused, not sent as infinity.
        let mut big = vec![1.0f32, 70_000.0];
        assert!(matches!(
            EncodedWeights::encode_as_sent(&mut big, WeightFormat::F16Zstd),
            Err(WeightsError::NonFinite { index: 1, .. })
        ));
    }

    #[test]
    fn checking_received_bytes_refuses_what_decoding_refuses() {
        let w = flat(9);
        let n = w.layout.numel();
        for fmt in WeightFormat::ALL {
            let bytes = w.encode(fmt);
            let enc = EncodedWeights::check(bytes.clone(), fmt, n).unwrap();
            assert_eq!(
                enc.decode().unwrap(),
                FlatWeights::decode(&bytes, fmt, &w.layout).unwrap().data
            );
            assert!(matches!(
                EncodedWeights::check(bytes, fmt, n + 1),
                Err(WeightsError::WrongLength { .. })
            ));
        }
        let mut bad = w.data.clone();
        bad[5] = f32::NAN;
        assert!(matches!(
            EncodedWeights::check(encode_values(&bad, WeightFormat::F32), WeightFormat::F32, n),
            Err(WeightsError::NonFinite { index: 5, .. })
        ));
    }

    #[test]
    fn decode_refuses_wrong_lengths() {
        let w = flat(3);
        for fmt in WeightFormat::ALL {
            let mut bytes = w.encode(fmt);
            let short = &bytes[..bytes.len() - 1];
            assert!(
                FlatWeights::decode(short, fmt, &w.layout).is_err(),
                "{fmt} short"
            );
            if fmt == WeightFormat::F16Zstd {
                let longer = encode_values(&random(w.layout.numel() + 1, 3, 0.5), fmt);
                let e = FlatWeights::decode(&longer, fmt, &w.layout).unwrap_err();
                assert!(matches!(e, WeightsError::TooLarge { .. }), "{e}");
                let shorter = encode_values(&random(w.layout.numel() - 1, 3, 0.5), fmt);
                let e = FlatWeights::decode(&shorter, fmt, &w.layout).unwrap_err();
                assert!(matches!(e, WeightsError::WrongLength { .. }), "{e}");
            } else {
                bytes.extend_from_slice(&[0, 0, 0, 0]);
                let e = FlatWeights::decode(&bytes, fmt, &w.layout).unwrap_err();
                assert!(matches!(e, WeightsError::WrongLength { .. }), "{e}");
            }
        }
    }

    #[test]
    fn decode_refuses_non_finite_values() {
        let w = flat(4);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e6] {
            for fmt in WeightFormat::ALL {
                if bad == 1e6 && fmt == WeightFormat::F32 {
                    continue; // finite in f32
                }
                let mut v = w.clone();
                v.data[37] = bad;
                assert!(v.check_encodable(fmt).is_err());
                let bytes = v.encode(fmt);
                match FlatWeights::decode(&bytes, fmt, &w.layout) {
                    Err(WeightsError::NonFinite { index, .. }) => assert_eq!(index, 37),
                    other => panic!("{fmt} {bad}: {other:?}"),
                }
            }
        }
        assert!(w.check_encodable(WeightFormat::F16).is_ok());
    }

    #[test]
    fn zstd_bomb_is_capped_at_the_layout_size() {
        let l = layout(&[("x", &[1000])]);
        // 64 MiB of zeros compresses to a few KiB. Declaring its size, the frame asks for a
        // window beyond the layout's size and zstd refuses it before decompressing anything.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        assert!(bomb.len() < 64 << 10);
        let e = FlatWeights::decode(&bomb, WeightFormat::F16Zstd, &l).unwrap_err();
        assert!(matches!(e, WeightsError::Decompress(_)), "{e}");
        // Streamed with a small window and no declared size, it decompresses until the cap.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
        enc.set_parameter(zstd::zstd_safe::CParameter::WindowLog(10))
            .unwrap();
        for _ in 0..16 {
            std::io::Write::write_all(&mut enc, &vec![0u8; 1 << 20]).unwrap();
        }
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        let e = FlatWeights::decode(&bomb, WeightFormat::F16Zstd, &l).unwrap_err();
        assert!(matches!(e, WeightsError::TooLarge { limit: 2000 }), "{e}");
        let garbage = FlatWeights::decode(b"not zstd at all", WeightFormat::F16Zstd, &l);
        assert!(matches!(garbage, Err(WeightsError::Decompress(_))));
    }
}
