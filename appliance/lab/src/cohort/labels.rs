//! The label values every cohort volume uses.

/// Outside the brain.
pub const BACKGROUND: u8 = 0;
/// Cerebrospinal fluid (ventricles, sulci).
pub const CSF: u8 = 1;
pub const GREY_MATTER: u8 = 2;
pub const WHITE_MATTER: u8 = 3;
/// Peritumoural oedema (replaces grey or white matter).
pub const OEDEMA: u8 = 4;
/// The tumour's contrast-enhancing rim.
pub const ENHANCING: u8 = 5;
/// The tumour's necrotic core.
pub const NECROTIC: u8 = 6;

/// Number of label values (0..NUM_LABELS).
pub const NUM_LABELS: usize = 7;

/// Names of the labels, indexed by value.
pub const NAMES: [&str; NUM_LABELS] = [
    "background",
    "csf",
    "grey_matter",
    "white_matter",
    "tumour_oedema",
    "tumour_enhancing_rim",
    "tumour_necrotic_core",
];

/// True for the three tumour labels.
pub fn is_tumour(label: u8) -> bool {
    (OEDEMA..=NECROTIC).contains(&label)
}
