//! The network-boundary guard on received data sets: walks the element headers of a P-DATA data
//! set (already fully in memory) before dicom-rs parses it, and refuses any element whose declared
//! length exceeds the bytes left in its enclosing item, sequence or data set, nesting deeper than a
//! limit, or more elements than a limit.
//!
//! Why: dicom-parser 0.10.1 allocates and zero-fills whatever value length an element header
//! declares before reading the value (bridge/FUZZING.md), so a few hundred bytes from the network
//! could make it allocate ~4 GiB, which aborts the process under a memory cap. A length larger
//! than the input can never be valid, so the check refuses nothing a conforming peer sends, and
//! once it passes every allocation the parser makes is bounded by the message size.
//!
//! The walk mirrors dicom-rs's header decoding: implicit VR uses a 4-byte length; explicit VR uses
//! a 2-byte length for the VRs PS3.5 Table 7.1-2 lists and a 4-byte one for every other (or
//! unknown) VR; item and delimitation tags (FFFE,xxxx) carry a 4-byte length and no VR in both.
//! Undefined lengths (FFFFFFFF) are followed into sequences (items up to the sequence delimiter,
//! FFFE,E0DD; undefined-length items up to the item delimiter, FFFE,E00D) and into encapsulated
//! pixel data (defined-length fragments). An UN element of undefined length holds implicit VR LE
//! (PS3.5 6.2.2). Deflated data sets are inflated with a size cap first, and offsets then refer
//! to the inflated stream.

use std::io::Read;

use dicom::core::Tag;
use dicom::encoding::transfer_syntax::{Codec, Endianness};
use dicom::encoding::TransferSyntax;

/// Undefined length.
const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: Tag = Tag(0xFFFE, 0xE000);
const ITEM_DELIMITER: Tag = Tag(0xFFFE, 0xE00D);
const SEQUENCE_DELIMITER: Tag = Tag(0xFFFE, 0xE0DD);
const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);

/// Bounds the guard enforces beyond "no length larger than the bytes left".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardLimits {
    /// Deepest sequence nesting accepted (a top-level sequence is depth 1).
    pub max_depth: usize,
    /// Most elements (items and fragments included) in one data set.
    pub max_elements: usize,
    /// Most bytes a deflated data set may inflate to.
    pub max_inflated_bytes: usize,
}

impl Default for GuardLimits {
    /// Depth 32, 1,000,000 elements, 256 MiB inflated: far above real instances (a CT slice has
    /// a few hundred elements; an RT structure set some tens of thousands).
    fn default() -> Self {
        GuardLimits {
            max_depth: 32,
            max_elements: 1_000_000,
            max_inflated_bytes: 256 << 20,
        }
    }
}

/// Why a data set was refused. Offsets are byte offsets of the element header in the data set
/// (in the inflated stream for deflated syntaxes).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    /// An element declares more value bytes than remain in its enclosing data set, item or
    /// sequence.
    #[error("element {tag} at offset {offset} declares {declared} bytes but only {left} remain")]
    LengthExceedsInput {
        /// Offset of the element header.
        offset: usize,
        /// The element's tag.
        tag: Tag,
        /// The declared value length.
        declared: u32,
        /// Bytes left in the enclosing container after the header.
        left: usize,
    },
    /// The input ends inside an element header.
    #[error("element header at offset {offset} is cut short ({left} bytes left)")]
    TruncatedHeader {
        /// Offset of the partial header.
        offset: usize,
        /// Bytes left.
        left: usize,
    },
    /// An undefined length on an element that cannot have one.
    #[error("element {tag} ({vr}) at offset {offset} has an undefined length")]
    UndefinedLength {
        /// Offset of the element header.
        offset: usize,
        /// The element's tag.
        tag: Tag,
        /// The VR as received.
        vr: String,
    },
    /// An item or delimitation tag where it cannot appear, or a non-item inside a sequence.
    #[error("unexpected {tag} at offset {offset} in {context}")]
    UnexpectedTag {
        /// Offset of the element header.
        offset: usize,
        /// The tag found.
        tag: Tag,
        /// Where it was found.
        context: &'static str,
    },
    /// An undefined-length sequence, item or pixel data without its delimiter.
    #[error("undefined-length {what} {tag} at offset {offset} is never closed")]
    Unterminated {
        /// Offset of the element or item header.
        offset: usize,
        /// The element's tag.
        tag: Tag,
        /// Sequence, item or encapsulated pixel data.
        what: &'static str,
    },
    /// Sequences nested deeper than [`GuardLimits::max_depth`].
    #[error("sequence {tag} at offset {offset} nests deeper than {limit}")]
    TooDeep {
        /// Offset of the element header.
        offset: usize,
        /// The sequence's tag.
        tag: Tag,
        /// The limit.
        limit: usize,
    },
    /// More elements than [`GuardLimits::max_elements`].
    #[error("more than {limit} elements (at offset {offset}, {tag})")]
    TooManyElements {
        /// Offset of the first element past the limit.
        offset: usize,
        /// Its tag.
        tag: Tag,
        /// The limit.
        limit: usize,
    },
    /// A deflated data set that inflates past [`GuardLimits::max_inflated_bytes`].
    #[error("deflated data set of {compressed} bytes inflates to more than {limit} bytes")]
    InflatedTooLarge {
        /// Size received.
        compressed: usize,
        /// The limit.
        limit: usize,
    },
    /// A deflated data set that does not inflate.
    #[error("cannot inflate the deflated data set ({compressed} bytes): {reason}")]
    Inflate {
        /// Size received.
        compressed: usize,
        /// The decoder's error.
        reason: String,
    },
}

/// Checks a received data set (no file meta) in transfer syntax `ts` with [`GuardLimits::default`].
/// `Ok` means every declared length fits the input, so parsing it allocates at most about the
/// input's size per element.
pub fn check_dataset_lengths(bytes: &[u8], ts: &TransferSyntax) -> Result<(), GuardError> {
    check_dataset_lengths_with(bytes, ts, &GuardLimits::default())
}

/// [`check_dataset_lengths`] with explicit limits.
pub fn check_dataset_lengths_with(
    bytes: &[u8],
    ts: &TransferSyntax,
    limits: &GuardLimits,
) -> Result<(), GuardError> {
    let big_endian = ts.endianness() == Endianness::Big;
    if matches!(ts.codec(), Codec::Dataset(_)) {
        // Deflated explicit VR little endian (the only data-set codec in the standard).
        let inflated = inflate_capped(bytes, limits.max_inflated_bytes)?;
        return Walker::new(&inflated, false, limits).run(true);
    }
    // The standard's only implicit VR syntax is 1.2.840.10008.1.2; every other one is explicit.
    let explicit = ts.uid().trim_end_matches('\0') != "1.2.840.10008.1.2";
    Walker::new(bytes, big_endian, limits).run(explicit)
}

/// Inflates raw deflate (PS3.5 A.5: no zlib header) into at most `cap` bytes.
fn inflate_capped(bytes: &[u8], cap: usize) -> Result<Vec<u8>, GuardError> {
    let mut out = Vec::new();
    let mut dec = flate2::read::DeflateDecoder::new(bytes).take(cap as u64 + 1);
    dec.read_to_end(&mut out).map_err(|e| GuardError::Inflate {
        compressed: bytes.len(),
        reason: e.to_string(),
    })?;
    if out.len() > cap {
        return Err(GuardError::InflatedTooLarge {
            compressed: bytes.len(),
            limit: cap,
        });
    }
    Ok(out)
}

/// VRs with a 2-byte length in explicit VR (PS3.5 Table 7.1-2, as dicom-rs 0.10.1 decodes them).
pub fn has_short_length(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FL"
            | b"FD"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    )
}

/// One decoded element header.
struct Header {
    offset: usize,
    tag: Tag,
    /// The explicit VR, if the encoding has one and this is not an item/delimiter.
    vr: Option<[u8; 2]>,
    len: u32,
    /// Offset of the value.
    value: usize,
}

/// How an undefined-length value continues.
enum Nested {
    /// A sequence of items; `explicit` is the encoding of the items' contents.
    Sequence { explicit: bool },
    /// Encapsulated pixel data: defined-length fragments.
    Fragments,
}

struct Walker<'a> {
    buf: &'a [u8],
    big_endian: bool,
    limits: &'a GuardLimits,
    elements: usize,
}

impl<'a> Walker<'a> {
    fn new(buf: &'a [u8], big_endian: bool, limits: &'a GuardLimits) -> Self {
        Walker {
            buf,
            big_endian,
            limits,
            elements: 0,
        }
    }

    fn run(mut self, explicit: bool) -> Result<(), GuardError> {
        let end = self.buf.len();
        let pos = self.dataset(0, end, explicit, 0, false)?;
        debug_assert_eq!(pos, end);
        Ok(())
    }

    fn u16_at(&self, pos: usize, big_endian: bool) -> u16 {
        let b = [self.buf[pos], self.buf[pos + 1]];
        if big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32_at(&self, pos: usize, big_endian: bool) -> u32 {
        let b = [
            self.buf[pos],
            self.buf[pos + 1],
            self.buf[pos + 2],
            self.buf[pos + 3],
        ];
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    /// Decodes the header at `pos` (which must lie before `end`), counting it as an element and
    /// checking a defined length against `end`.
    fn header(&mut self, pos: usize, end: usize, explicit: bool) -> Result<Header, GuardError> {
        // Contents of an undefined-length UN are implicit VR *little* endian whatever the syntax.
        let be = self.big_endian && explicit;
        let need = |n: usize| {
            if end - pos < n {
                Err(GuardError::TruncatedHeader {
                    offset: pos,
                    left: end - pos,
                })
            } else {
                Ok(())
            }
        };
        need(8)?;
        let tag = Tag(self.u16_at(pos, be), self.u16_at(pos + 2, be));
        self.elements += 1;
        if self.elements > self.limits.max_elements {
            return Err(GuardError::TooManyElements {
                offset: pos,
                tag,
                limit: self.limits.max_elements,
            });
        }
        let (vr, len, value) = if tag.group() == 0xFFFE || !explicit {
            (None, self.u32_at(pos + 4, be), pos + 8)
        } else {
            let vr = [self.buf[pos + 4], self.buf[pos + 5]];
            if has_short_length(vr) {
                (Some(vr), u32::from(self.u16_at(pos + 6, be)), pos + 8)
            } else {
                need(12)?;
                (Some(vr), self.u32_at(pos + 8, be), pos + 12)
            }
        };
        if len != UNDEFINED && len as usize > end - value {
            return Err(GuardError::LengthExceedsInput {
                offset: pos,
                tag,
                declared: len,
                left: end - value,
            });
        }
        Ok(Header {
            offset: pos,
            tag,
            vr,
            len,
            value,
        })
    }

    /// Walks data set elements from `pos` to `end`; inside an undefined-length item
    /// (`in_undefined_item`) it stops after the item delimiter. Returns the position after it.
    fn dataset(
        &mut self,
        mut pos: usize,
        end: usize,
        explicit: bool,
        depth: usize,
        in_undefined_item: bool,
    ) -> Result<usize, GuardError> {
        let start = pos;
        while pos < end {
            let h = self.header(pos, end, explicit)?;
            if h.tag == ITEM_DELIMITER && in_undefined_item {
                return Ok(h.value);
            }
            if h.tag.group() == 0xFFFE {
                return Err(GuardError::UnexpectedTag {
                    offset: h.offset,
                    tag: h.tag,
                    context: "a data set",
                });
            }
            pos = if h.len == UNDEFINED {
                let nested = self.undefined_kind(&h, explicit)?;
                self.nested(&h, end, depth, nested)?
            } else if self.is_sequence(&h, explicit) {
                let v_end = h.value + h.len as usize;
                self.items(&h, h.value, v_end, explicit, depth + 1, false)?;
                v_end
            } else {
                h.value + h.len as usize
            };
        }
        if in_undefined_item {
            return Err(GuardError::Unterminated {
                offset: start.saturating_sub(8),
                tag: ITEM,
                what: "item",
            });
        }
        Ok(pos)
    }

    /// Whether a defined-length element holds items (dicom-rs parses SQ contents; in implicit VR
    /// it takes the VR from the standard dictionary).
    fn is_sequence(&self, h: &Header, explicit: bool) -> bool {
        match h.vr {
            Some(vr) => &vr == b"SQ",
            None if explicit => false,
            None => {
                use dicom::core::dictionary::{DataDictionary, DataDictionaryEntry};
                dicom::dictionary_std::StandardDataDictionary
                    .by_tag(h.tag)
                    .is_some_and(|e| {
                        matches!(e.vr(), dicom::core::dictionary::VirtualVr::Exact(v)
                            if v == dicom::core::VR::SQ)
                    })
            }
        }
    }

    fn undefined_kind(&self, h: &Header, explicit: bool) -> Result<Nested, GuardError> {
        match h.vr {
            Some(vr) if &vr == b"SQ" => Ok(Nested::Sequence { explicit }),
            // PS3.5 6.2.2: an UN sequence of undefined length is implicit VR LE inside.
            Some(vr) if &vr == b"UN" => Ok(Nested::Sequence { explicit: false }),
            Some(vr) if h.tag == PIXEL_DATA && (&vr == b"OB" || &vr == b"OW") => {
                Ok(Nested::Fragments)
            }
            Some(vr) => Err(GuardError::UndefinedLength {
                offset: h.offset,
                tag: h.tag,
                vr: String::from_utf8_lossy(&vr).into_owned(),
            }),
            None if h.tag == PIXEL_DATA => Ok(Nested::Fragments),
            None => Ok(Nested::Sequence { explicit }),
        }
    }

    /// Follows an undefined-length value; returns the position after its sequence delimiter.
    fn nested(
        &mut self,
        h: &Header,
        end: usize,
        depth: usize,
        nested: Nested,
    ) -> Result<usize, GuardError> {
        match nested {
            Nested::Sequence { explicit } => self.items(h, h.value, end, explicit, depth + 1, true),
            Nested::Fragments => {
                let mut pos = h.value;
                while pos < end {
                    // Fragment headers use the syntax's byte order (`true`: not UN contents).
                    let f = self.header(pos, end, true)?;
                    if f.tag == SEQUENCE_DELIMITER {
                        return Ok(f.value);
                    }
                    if f.tag != ITEM || f.len == UNDEFINED {
                        return Err(GuardError::UnexpectedTag {
                            offset: f.offset,
                            tag: f.tag,
                            context: "encapsulated pixel data",
                        });
                    }
                    pos = f.value + f.len as usize;
                }
                Err(GuardError::Unterminated {
                    offset: h.offset,
                    tag: h.tag,
                    what: "encapsulated pixel data",
                })
            }
        }
    }

    /// Walks the items of sequence `h` between `pos` and `end`. With `undefined`, stops after the
    /// sequence delimiter and returns the position after it; otherwise returns `end`.
    fn items(
        &mut self,
        h: &Header,
        mut pos: usize,
        end: usize,
        explicit: bool,
        depth: usize,
        undefined: bool,
    ) -> Result<usize, GuardError> {
        if depth > self.limits.max_depth {
            return Err(GuardError::TooDeep {
                offset: h.offset,
                tag: h.tag,
                limit: self.limits.max_depth,
            });
        }
        while pos < end {
            let item = self.header(pos, end, explicit)?;
            if undefined && item.tag == SEQUENCE_DELIMITER {
                return Ok(item.value);
            }
            if item.tag != ITEM {
                return Err(GuardError::UnexpectedTag {
                    offset: item.offset,
                    tag: item.tag,
                    context: "a sequence",
                });
            }
            pos = if item.len == UNDEFINED {
                self.dataset(item.value, end, explicit, depth, true)?
            } else {
                let i_end = item.value + item.len as usize;
                self.dataset(item.value, i_end, explicit, depth, false)?
            };
        }
        if undefined {
            return Err(GuardError::Unterminated {
                offset: h.offset,
                tag: h.tag,
                what: "sequence",
            });
        }
        Ok(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom::core::{DataElement, PrimitiveValue, VR};
    use dicom::dictionary_std::tags;
    use dicom::object::InMemDicomObject;
    use dicom::transfer_syntax::TransferSyntaxIndex;
    use dicom::transfer_syntax::TransferSyntaxRegistry;

    const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
    const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

    fn ts(uid: &str) -> &'static TransferSyntax {
        TransferSyntaxRegistry.get(uid).expect("known syntax")
    }

    /// A data set with a string, a long text, a nested sequence and pixel data.
    fn sample() -> InMemDicomObject {
        let mut inner = InMemDicomObject::new_empty();
        inner.put(DataElement::new(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3.4"),
        ));
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::PATIENT_NAME,
            VR::PN,
            PrimitiveValue::from("Doe^Jane"),
        ));
        obj.put(DataElement::new(
            tags::IMAGE_COMMENTS,
            VR::LT,
            PrimitiveValue::from("x".repeat(300)),
        ));
        obj.put(DataElement::new(
            tags::REFERENCED_IMAGE_SEQUENCE,
            VR::SQ,
            dicom::core::value::DataSetSequence::from(vec![inner]),
        ));
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(vec![7u16; 64].into()),
        ));
        obj
    }

    fn encode(obj: &InMemDicomObject, uid: &str) -> Vec<u8> {
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, ts(uid))
            .expect("encode");
        out
    }

    #[test]
    fn accepts_well_formed_data_sets_in_every_syntax() {
        for uid in [IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED] {
            let bytes = encode(&sample(), uid);
            check_dataset_lengths(&bytes, ts(uid)).unwrap_or_else(|e| panic!("{uid}: {e}"));
        }
    }

    /// Finds the value-length field of the element with `tag` in an LE encoding.
    fn find_tag(bytes: &[u8], tag: Tag) -> usize {
        let pat = [
            tag.0.to_le_bytes()[0],
            tag.0.to_le_bytes()[1],
            tag.1.to_le_bytes()[0],
            tag.1.to_le_bytes()[1],
        ];
        bytes
            .windows(4)
            .position(|w| w == pat)
            .expect("tag present")
    }

    #[test]
    fn refuses_a_string_length_past_the_end_with_offset_and_tag() {
        // Explicit VR LE: PN has a 2-byte length at offset +6.
        let mut bytes = encode(&sample(), EXPLICIT_LE);
        let at = find_tag(&bytes, tags::PATIENT_NAME);
        bytes[at + 6..at + 8].copy_from_slice(&0xFFFFu16.to_le_bytes());
        let e = check_dataset_lengths(&bytes, ts(EXPLICIT_LE)).unwrap_err();
        match e {
            GuardError::LengthExceedsInput {
                offset,
                tag,
                declared,
                left,
            } => {
                assert_eq!(offset, at);
                assert_eq!(tag, tags::PATIENT_NAME);
                assert_eq!(declared, 0xFFFF);
                assert_eq!(left, bytes.len() - at - 8);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn refuses_a_long_length_in_implicit_and_explicit_syntaxes() {
        // Pixel data is OW: a 4-byte length in both (after VR and reserved bytes in explicit VR).
        for (uid, len_at) in [(IMPLICIT_LE, 4), (EXPLICIT_LE, 8)] {
            let mut bytes = encode(&sample(), uid);
            let at = find_tag(&bytes, tags::PIXEL_DATA);
            bytes[at + len_at..at + len_at + 4].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
            let e = check_dataset_lengths(&bytes, ts(uid)).unwrap_err();
            assert!(
                matches!(e, GuardError::LengthExceedsInput { tag, declared: 0xDEAD_BEEF, .. }
                    if tag == tags::PIXEL_DATA),
                "{uid}: {e}"
            );
        }
    }

    #[test]
    fn refuses_a_big_endian_length_past_the_end() {
        let mut bytes = encode(&sample(), EXPLICIT_BE);
        let pat = [0x7F, 0xE0, 0x00, 0x10]; // (7FE0,0010) big endian
        let at = bytes.windows(4).position(|w| w == pat).expect("tag");
        bytes[at + 8..at + 12].copy_from_slice(&0x7FFF_0000u32.to_be_bytes());
        let e = check_dataset_lengths(&bytes, ts(EXPLICIT_BE)).unwrap_err();
        assert!(
            matches!(
                e,
                GuardError::LengthExceedsInput {
                    declared: 0x7FFF_0000,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn an_item_length_is_bounded_by_its_item() {
        // Implicit VR LE by hand: a defined-length sequence with one defined-length item holding
        // (0008,1155), then a patient name after the sequence.
        let mut b = Vec::new();
        let header = |b: &mut Vec<u8>, g: u16, e: u16, len: u32| {
            b.extend_from_slice(&g.to_le_bytes());
            b.extend_from_slice(&e.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        };
        header(&mut b, 0x0008, 0x1140, 20);
        header(&mut b, 0xFFFE, 0xE000, 12);
        header(&mut b, 0x0008, 0x1155, 4);
        b.extend_from_slice(b"1.2\0");
        header(&mut b, 0x0010, 0x0010, 8);
        b.extend_from_slice(b"Doe^Jane");
        check_dataset_lengths(&b, ts(IMPLICIT_LE)).expect("well formed");
        assert!(InMemDicomObject::read_dataset_with_ts(&b[..], ts(IMPLICIT_LE)).is_ok());
        // 12 bytes fit in the input after the header but not in the item.
        let mut bad = b.clone();
        bad[20..24].copy_from_slice(&12u32.to_le_bytes());
        let e = check_dataset_lengths(&bad, ts(IMPLICIT_LE)).unwrap_err();
        assert_eq!(
            e,
            GuardError::LengthExceedsInput {
                offset: 16,
                tag: tags::REFERENCED_SOP_INSTANCE_UID,
                declared: 12,
                left: 4
            }
        );
        // And the item's own length is bounded by the sequence's.
        let mut bad = b.clone();
        bad[12..16].copy_from_slice(&20u32.to_le_bytes());
        let e = check_dataset_lengths(&bad, ts(IMPLICIT_LE)).unwrap_err();
        assert!(
            matches!(
                e,
                GuardError::LengthExceedsInput {
                    offset: 8,
                    declared: 20,
                    left: 12,
                    ..
                }
            ),
            "{e}"
        );
    }

    /// Hand-built implicit VR LE: `(0008,1140)` undefined-length SQ with one undefined-length
    /// item, nested `depth` times, then a string.
    fn nested_sequences(depth: usize) -> Vec<u8> {
        let mut b = Vec::new();
        let header = |b: &mut Vec<u8>, g: u16, e: u16, len: u32| {
            b.extend_from_slice(&g.to_le_bytes());
            b.extend_from_slice(&e.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        };
        for _ in 0..depth {
            header(&mut b, 0x0008, 0x1140, UNDEFINED);
            header(&mut b, 0xFFFE, 0xE000, UNDEFINED);
        }
        header(&mut b, 0x0008, 0x1155, 4);
        b.extend_from_slice(b"1.2\0");
        for _ in 0..depth {
            header(&mut b, 0xFFFE, 0xE00D, 0);
            header(&mut b, 0xFFFE, 0xE0DD, 0);
        }
        b
    }

    #[test]
    fn undefined_lengths_are_followed_and_depth_is_limited() {
        let limits = GuardLimits {
            max_depth: 4,
            ..GuardLimits::default()
        };
        let ok = nested_sequences(4);
        check_dataset_lengths_with(&ok, ts(IMPLICIT_LE), &limits).expect("depth 4");
        let parsed = InMemDicomObject::read_dataset_with_ts(&ok[..], ts(IMPLICIT_LE));
        assert!(parsed.is_ok(), "dicom-rs reads the hand-built data set");
        let deep = nested_sequences(5);
        let e = check_dataset_lengths_with(&deep, ts(IMPLICIT_LE), &limits).unwrap_err();
        assert!(matches!(e, GuardError::TooDeep { limit: 4, .. }), "{e}");
        // Without the closing delimiters.
        let cut = &ok[..ok.len() - 16];
        let e = check_dataset_lengths(cut, ts(IMPLICIT_LE)).unwrap_err();
        assert!(matches!(e, GuardError::Unterminated { .. }), "{e}");
    }

    #[test]
    fn element_count_and_inflated_size_are_limited() {
        let bytes = encode(&sample(), EXPLICIT_LE);
        let limits = GuardLimits {
            max_elements: 3,
            ..GuardLimits::default()
        };
        let e = check_dataset_lengths_with(&bytes, ts(EXPLICIT_LE), &limits).unwrap_err();
        assert!(
            matches!(e, GuardError::TooManyElements { limit: 3, .. }),
            "{e}"
        );

        let deflated = encode(&sample(), DEFLATED);
        let limits = GuardLimits {
            max_inflated_bytes: 100,
            ..GuardLimits::default()
        };
        let e = check_dataset_lengths_with(&deflated, ts(DEFLATED), &limits).unwrap_err();
        assert!(
            matches!(e, GuardError::InflatedTooLarge { limit: 100, .. }),
            "{e}"
        );
        let e = check_dataset_lengths(&deflated[..deflated.len() / 2], ts(DEFLATED)).unwrap_err();
        assert!(matches!(e, GuardError::Inflate { .. }), "{e}");
    }

    #[test]
    fn encapsulated_fragments_are_checked() {
        let mut b = Vec::new();
        // (7FE0,0010) OB undefined length, offset table item (0), one fragment of 4, delimiter.
        b.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
        b.extend_from_slice(&UNDEFINED.to_le_bytes());
        for (len, body) in [(0u32, &[][..]), (4, &[1u8, 2, 3, 4][..])] {
            b.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(body);
        }
        b.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        check_dataset_lengths(&b, ts("1.2.840.10008.1.2.4.50")).expect("well formed");
        let mut bad = b.clone();
        bad[24..28].copy_from_slice(&1000u32.to_le_bytes()); // the fragment's length
        let e = check_dataset_lengths(&bad, ts("1.2.840.10008.1.2.4.50")).unwrap_err();
        assert!(
            matches!(
                e,
                GuardError::LengthExceedsInput {
                    offset: 20,
                    declared: 1000,
                    ..
                }
            ),
            "{e}"
        );
    }
}
