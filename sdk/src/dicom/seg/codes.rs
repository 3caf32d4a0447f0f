//! The coded concepts a SEG carries: what each segment is (SNOMED CT category and type) and which
//! algorithm family produced it.

/// A coded concept (code value, coding scheme designator, code meaning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub value: String,
    pub scheme: String,
    pub meaning: String,
}

impl Code {
    /// A code in any scheme.
    pub fn new(value: &str, scheme: &str, meaning: &str) -> Self {
        Code {
            value: value.into(),
            scheme: scheme.into(),
            meaning: meaning.into(),
        }
    }

    /// A SNOMED CT code (scheme designator `SCT`).
    pub fn sct(value: &str, meaning: &str) -> Self {
        Code::new(value, "SCT", meaning)
    }

    /// SCT 85756007 Tissue (a segmented property category).
    pub fn tissue() -> Self {
        Code::sct("85756007", "Tissue")
    }

    /// SCT 49755003 Morphologically Abnormal Structure (a segmented property category).
    pub fn morphologically_abnormal_structure() -> Self {
        Code::sct("49755003", "Morphologically Abnormal Structure")
    }

    /// SCT 91723000 Anatomical Structure (a segmented property category).
    pub fn anatomical_structure() -> Self {
        Code::sct("91723000", "Anatomical Structure")
    }

    /// DCM 123110 Artificial Intelligence (CID 7162 algorithm family).
    pub fn artificial_intelligence() -> Self {
        Code::new("123110", "DCM", "Artificial Intelligence")
    }
}

/// One segment of a SEG: which label value it is, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentDescription {
    /// The voxels of the label volume with this value form the segment.
    pub label_value: u8,
    /// SegmentLabel (LO, up to 64 characters).
    pub label: String,
    /// SegmentedPropertyCategoryCodeSequence.
    pub category: Code,
    /// SegmentedPropertyTypeCodeSequence.
    pub property_type: Code,
}

impl SegmentDescription {
    /// A segment from a class name, with SNOMED CT codes for the classes Cosilo's cohorts use
    /// (`csf`, `grey_matter`, `white_matter`, `tumour*`, `brain`); any other name is coded as
    /// Tissue / Tissue.
    pub fn for_class(label_value: u8, name: &str) -> Self {
        let lower = name.to_ascii_lowercase();
        let (category, property_type) = if lower.contains("tumour") || lower.contains("tumor") {
            (
                Code::morphologically_abnormal_structure(),
                Code::sct("108369006", "Neoplasm"),
            )
        } else if lower == "csf" || lower.contains("cerebrospinal") {
            (Code::tissue(), Code::sct("65216001", "Cerebrospinal Fluid"))
        } else if lower.starts_with("grey") || lower.starts_with("gray") {
            (Code::tissue(), Code::sct("389081007", "Gray Matter"))
        } else if lower.starts_with("white") {
            (Code::tissue(), Code::sct("389080008", "White Matter"))
        } else if lower == "brain" {
            (Code::anatomical_structure(), Code::sct("12738006", "Brain"))
        } else {
            (Code::tissue(), Code::tissue())
        };
        SegmentDescription {
            label_value,
            label: name.chars().take(64).collect(),
            category,
            property_type,
        }
    }
}

/// One segment per non-background class of a bundle (every class whose label value is not 0), in
/// manifest order, coded as [`SegmentDescription::for_class`] does.
pub fn segments_for_classes(classes: &[crate::bundle::ClassSpec]) -> Vec<SegmentDescription> {
    classes
        .iter()
        .filter(|c| c.label != 0)
        .map(|c| SegmentDescription::for_class(c.label, &c.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_get_snomed_codes() {
        assert_eq!(
            SegmentDescription::for_class(5, "tumour_enhancing_rim")
                .property_type
                .value,
            "108369006"
        );
        assert_eq!(
            SegmentDescription::for_class(2, "grey_matter")
                .property_type
                .value,
            "389081007"
        );
        assert_eq!(
            SegmentDescription::for_class(1, "csf").property_type.value,
            "65216001"
        );
    }
}
