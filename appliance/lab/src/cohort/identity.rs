//! Fake patient identities. They exist only so that later tests can prove that no patient-identifying
//! data leaves a hospital: they are written into the manifest and nowhere else (not into the NIfTI
//! headers, not into file names).

use cosilo_rng::Rng;

const SURNAMES: [&str; 32] = [
    "ABERNATHY",
    "BALDWIN",
    "CARVALHO",
    "DUBOIS",
    "EKSTROM",
    "FERRARI",
    "GALLAGHER",
    "HOFFMANN",
    "IBARRA",
    "JANSSEN",
    "KOWALSKI",
    "LINDQVIST",
    "MORENO",
    "NAKAMURA",
    "OKAFOR",
    "PETROV",
    "QUINTERO",
    "ROSSI",
    "SCHNEIDER",
    "TANAKA",
    "UDDIN",
    "VARGA",
    "WOJCIK",
    "XU",
    "YILMAZ",
    "ZIMMERMANN",
    "NOVAK",
    "HALVORSEN",
    "MBEKI",
    "OLIVEIRA",
    "BRENNAN",
    "KEMPF",
];

const GIVEN: [&str; 32] = [
    "ADA", "BRUNO", "CLARA", "DAVID", "ELENA", "FELIX", "GRETA", "HUGO", "INES", "JONAS", "KARIN",
    "LUCA", "MARTA", "NIKOLAI", "OLGA", "PAUL", "RUTH", "SIMON", "TERESA", "ULRICH", "VERA",
    "WALTER", "YARA", "ZOLTAN", "AMIR", "BEATRIZ", "CHEN", "DIANA", "EMIL", "FATIMA", "GEORG",
    "HANNA",
];

/// A fake patient: DICOM-style name `SURNAME^GIVEN` and a hospital-prefixed ID such as `H1-004821`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub id: String,
}

/// `n` distinct identities for one hospital (prefix e.g. `H1`), drawn from `rng`.
pub fn identities(rng: &mut Rng, prefix: &str, n: usize) -> Vec<Identity> {
    let mut out: Vec<Identity> = Vec::with_capacity(n);
    while out.len() < n {
        let name = format!(
            "{}^{}",
            SURNAMES[rng.below(SURNAMES.len())],
            GIVEN[rng.below(GIVEN.len())]
        );
        let id = format!("{prefix}-{:06}", rng.below(1_000_000));
        if out.iter().any(|o| o.id == id || o.name == name) && n <= SURNAMES.len() * GIVEN.len() {
            continue;
        }
        out.push(Identity { name, id });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_distinct_and_reproducible() {
        let a = identities(&mut Rng::new(1), "H2", 60);
        let b = identities(&mut Rng::new(1), "H2", 60);
        assert_eq!(a, b);
        for (i, x) in a.iter().enumerate() {
            assert!(x.id.starts_with("H2-") && x.id.len() == 9, "{}", x.id);
            assert!(x.name.contains('^'));
            assert!(a[..i].iter().all(|y| y.id != x.id && y.name != x.name));
        }
    }
}
