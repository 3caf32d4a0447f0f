//! FedSM inference: a site selector says which hospital's distribution a study comes from, and a
//! routing rule picks the hospital's personalised model or the global one (docs/FEDSM.md).
//!
//! - [`SiteSelectorModel`] runs the selector's ONNX model (`image [N, C, H, W]` →
//!   `site_probabilities [N, K]`) on slices prepared exactly as [`crate::Segmenter`] prepares them
//!   (the manifest's normalisation over the whole volume, each axial slice zero-padded centred to
//!   the size multiple).
//! - [`pool_log_mean`] pools the per-slice probabilities of a volume into one distribution: the
//!   **mean of the log-probabilities** over the slices, renormalised (a normalised geometric mean).
//!   A study is one patient from one scanner, so every slice is evidence about the same site; the
//!   log-mean treats the slices as independent votes and a site that some slices rule out firmly
//!   (probability near 0) cannot win on the others' average.
//! - [`RoutingRule::route`]: the personalised model when the pooled top probability exceeds γ and
//!   that site is this hospital, the global model otherwise (FedSM's rule, default γ = 0.9).
//!
//! Departure from the published FedSM: the paper routes each 2-D image on its own probabilities;
//! Cosilo routes a whole volume once, so every slice of a study is segmented by the same model and
//! the result can name the model it used.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;
use serde::{Deserialize, Serialize};

use crate::preprocess::Normalisation;
use crate::segment::{runtime, SegmentError, SegmenterOptions};
use crate::volume::Volume;

/// The selector model's input name (as the segmentation model's).
pub const SELECTOR_INPUT: &str = crate::bundle::INPUT_NAME;
/// The selector model's output name.
pub const SELECTOR_OUTPUT: &str = "site_probabilities";
/// FedSM's default routing threshold γ.
pub const DEFAULT_GAMMA: f64 = 0.9;

/// The site selector loaded into ONNX Runtime.
pub struct SiteSelectorModel {
    path: PathBuf,
    sites: usize,
    session: Mutex<Session>,
}

impl std::fmt::Debug for SiteSelectorModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteSelectorModel")
            .field("path", &self.path)
            .field("sites", &self.sites)
            .finish()
    }
}

impl SiteSelectorModel {
    /// Loads a selector model from its bytes; `path` names it in errors; `sites` is K.
    pub fn from_bytes(
        model: &[u8],
        path: &Path,
        sites: usize,
        options: &SegmenterOptions,
    ) -> Result<Self, SegmentError> {
        let (_, environment) = runtime(options.ort_library.as_deref())?;
        let session_err = |source: ort::Error| SegmentError::Session {
            path: path.to_path_buf(),
            source,
        };
        let mut builder = Session::builder(&environment)
            .map_err(session_err)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| session_err(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| session_err(e.into()))?;
        if let Some(n) = options.intra_threads {
            builder = builder
                .with_intra_threads(n)
                .map_err(|e| session_err(e.into()))?;
        }
        let session = builder.commit_from_memory(model).map_err(session_err)?;
        Ok(SiteSelectorModel {
            path: path.to_path_buf(),
            sites,
            session: Mutex::new(session),
        })
    }

    /// K, the number of sites.
    pub fn sites(&self) -> usize {
        self.sites
    }

    /// Site probabilities `[n, K]` row-major for prepared slices `shape = [n, c, h, w]`.
    pub fn slice_probabilities(
        &self,
        input: &[f32],
        shape: [usize; 4],
    ) -> Result<Vec<f32>, SegmentError> {
        if shape.iter().product::<usize>() != input.len() {
            return Err(SegmentError::InputShape {
                shape,
                got: input.len(),
            });
        }
        let infer = |source| SegmentError::Inference {
            first: 0,
            last: shape[0].saturating_sub(1),
            source,
        };
        let tensor = TensorRef::from_array_view((shape, input)).map_err(infer)?;
        let mut session = self.session.lock().map_err(|_| SegmentError::Poisoned)?;
        let outputs = session
            .run(ort::inputs![SELECTOR_INPUT => tensor])
            .map_err(infer)?;
        let value = outputs
            .get(SELECTOR_OUTPUT)
            .ok_or_else(|| SegmentError::MissingOutput {
                name: SELECTOR_OUTPUT.into(),
            })?;
        let (out_shape, probs) = value.try_extract_tensor::<f32>().map_err(infer)?;
        let expected = [shape[0] as i64, self.sites as i64];
        if **out_shape != expected {
            return Err(SegmentError::OutputShape {
                expected: expected.to_vec(),
                found: out_shape.to_vec(),
            });
        }
        Ok(probs.to_vec())
    }

    /// Per-slice site probabilities `[nz, K]` of a volume, its slices normalised with
    /// `normalisation` and zero-padded centred to multiples of `size_multiple`, one slice per call.
    pub fn volume_slice_probabilities(
        &self,
        volume: &Volume<f32>,
        normalisation: &Normalisation,
        size_multiple: usize,
    ) -> Result<Vec<f32>, SegmentError> {
        let geometry = &volume.geometry;
        let [nx, ny, nz] = geometry.dims;
        if geometry.is_empty() || volume.data.len() != geometry.len() {
            return Err(SegmentError::EmptyVolume {
                dims: geometry.dims,
            });
        }
        let m = size_multiple.max(1);
        let image = normalisation.apply(&volume.data);
        let (h, w) = (ny.div_ceil(m) * m, nx.div_ceil(m) * m);
        let (py, px) = ((h - ny) / 2, (w - nx) / 2);
        let mut slice = vec![0f32; h * w];
        let mut out = Vec::with_capacity(nz * self.sites);
        for k in 0..nz {
            slice.fill(0.0);
            let src = &image[k * nx * ny..(k + 1) * nx * ny];
            for y in 0..ny {
                let dst = (y + py) * w + px;
                slice[dst..dst + nx].copy_from_slice(&src[y * nx..(y + 1) * nx]);
            }
            out.extend(self.slice_probabilities(&slice, [1, 1, h, w])?);
        }
        Ok(out)
    }
}

/// Pools per-slice probabilities `[n, K]` into one distribution over the K sites: the mean of the
/// log-probabilities (each clamped below at 1e-12), exponentiated and renormalised to sum to 1.
/// An empty input gives the uniform distribution.
pub fn pool_log_mean(per_slice: &[f32], sites: usize) -> Vec<f64> {
    let n = per_slice.len().checked_div(sites).unwrap_or(0);
    if n == 0 {
        return vec![1.0 / sites.max(1) as f64; sites];
    }
    let mut mean = vec![0f64; sites];
    for row in per_slice.chunks_exact(sites) {
        for (m, &p) in mean.iter_mut().zip(row) {
            *m += (p as f64).max(1e-12).ln() / n as f64;
        }
    }
    let top = mean.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = mean.iter().map(|m| (m - top).exp()).collect();
    let total: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

/// Which of the routed bundle's segmentation models a study went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutedModel {
    /// This hospital's personalised model `P_k`.
    Personalised,
    /// The federation's global model.
    Global,
}

impl RoutedModel {
    /// `personalised` or `global`.
    pub fn as_str(self) -> &'static str {
        match self {
            RoutedModel::Personalised => "personalised",
            RoutedModel::Global => "global",
        }
    }
}

/// FedSM's routing rule as a bundle carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingRule {
    /// Route to the personalised model only when the pooled top probability exceeds this.
    pub gamma: f64,
    /// The selector's site names, in its output order.
    pub sites: Vec<String>,
    /// Index in `sites` of the hospital whose personalised model the bundle carries.
    pub this_site: usize,
    /// How slice probabilities are pooled over a volume (`mean_log_probability`).
    pub pooling: String,
}

/// The routing decision for one study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub model: RoutedModel,
    /// The most probable site (index into [`RoutingRule::sites`]) and its name.
    pub top_site: usize,
    pub top_site_name: String,
    /// The pooled probability of every site, in [`RoutingRule::sites`] order.
    pub probabilities: Vec<f64>,
}

/// The pooling [`RoutingRule::pooling`] names.
pub const POOLING_MEAN_LOG: &str = "mean_log_probability";

impl RoutingRule {
    /// A rule with FedSM's default γ and log-mean pooling.
    pub fn new(sites: Vec<String>, this_site: usize) -> Self {
        RoutingRule {
            gamma: DEFAULT_GAMMA,
            sites,
            this_site,
            pooling: POOLING_MEAN_LOG.into(),
        }
    }

    /// Checks the rule can be applied.
    pub fn validate(&self) -> Result<(), String> {
        if self.sites.len() < 2 {
            return Err(format!(
                "{} sites; a selector needs at least 2",
                self.sites.len()
            ));
        }
        if self.this_site >= self.sites.len() {
            return Err(format!(
                "this_site {} is outside the {} sites",
                self.this_site,
                self.sites.len()
            ));
        }
        if !(0.0..1.0).contains(&self.gamma) {
            return Err(format!("gamma {} must be in [0, 1)", self.gamma));
        }
        if self.pooling != POOLING_MEAN_LOG {
            return Err(format!(
                "pooling {:?} is not supported (only {POOLING_MEAN_LOG:?})",
                self.pooling
            ));
        }
        Ok(())
    }

    /// Routes a study from its pooled site probabilities.
    pub fn route(&self, probabilities: Vec<f64>) -> Route {
        let (top_site, top) =
            probabilities
                .iter()
                .cloned()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (i, p)| if p > b.1 { (i, p) } else { b },
                );
        let model = if top > self.gamma && top_site == self.this_site {
            RoutedModel::Personalised
        } else {
            RoutedModel::Global
        };
        Route {
            model,
            top_site,
            top_site_name: self.sites.get(top_site).cloned().unwrap_or_default(),
            probabilities,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_mean_pooling_is_a_normalised_geometric_mean() {
        let p = pool_log_mean(&[0.9, 0.1, 0.6, 0.4], 2);
        let (a, b) = ((0.9f64 * 0.6).sqrt(), (0.1f64 * 0.4).sqrt());
        assert!((p[0] - a / (a + b)).abs() < 1e-6, "{p:?}");
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // A site some slice rules out firmly loses even if the mean probability favours it.
        let p = pool_log_mean(&[0.99, 0.01, 0.99, 0.01, 0.0, 1.0], 2);
        assert!(p[1] > 0.5, "{p:?}");
        assert_eq!(pool_log_mean(&[], 4), vec![0.25; 4]);
    }

    #[test]
    fn routing_needs_confidence_and_this_hospital() {
        let rule = RoutingRule::new(vec!["a".into(), "b".into(), "c".into()], 1);
        rule.validate().unwrap();
        let r = rule.route(vec![0.02, 0.95, 0.03]);
        assert_eq!(
            (r.model, r.top_site, r.top_site_name.as_str()),
            (RoutedModel::Personalised, 1, "b")
        );
        assert_eq!(rule.route(vec![0.1, 0.85, 0.05]).model, RoutedModel::Global);
        assert_eq!(
            rule.route(vec![0.97, 0.02, 0.01]).model,
            RoutedModel::Global
        );
        assert_eq!(
            rule.route(vec![0.05, 0.9, 0.05]).model,
            RoutedModel::Global,
            "γ is strict"
        );
        assert!(RoutingRule {
            this_site: 3,
            ..rule.clone()
        }
        .validate()
        .is_err());
        assert!(RoutingRule {
            gamma: 1.0,
            ..rule.clone()
        }
        .validate()
        .is_err());
        assert!(RoutingRule {
            pooling: "mean".into(),
            ..rule
        }
        .validate()
        .is_err());
    }
}

/// The routed bundle's files: `routing.json` (this type), `selector.onnx`, and two ordinary
/// bundles, `global/` and `personalised/` (each `model.onnx` + `manifest.json`).
pub const ROUTING_FILE: &str = "routing.json";
/// The selector model's file in a routed bundle.
pub const SELECTOR_FILE: &str = "selector.onnx";
/// The global model's bundle directory in a routed bundle.
pub const GLOBAL_DIR: &str = "global";
/// The personalised model's bundle directory in a routed bundle.
pub const PERSONALISED_DIR: &str = "personalised";
/// The routed bundle format this SDK reads.
pub const ROUTED_FORMAT_VERSION: u32 = 1;

/// `routing.json`: the rule and the selector's description and checksum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingManifest {
    pub format_version: u32,
    pub rule: RoutingRule,
    /// SHA-256 of `selector.onnx`.
    pub selector_sha256: String,
    /// Slices are zero-padded centred to multiples of this for the selector.
    pub selector_size_multiple: usize,
}

impl RoutingManifest {
    /// Whether `dir` holds a routed bundle (has `routing.json`).
    pub fn is_routed_bundle(dir: &Path) -> bool {
        dir.join(ROUTING_FILE).is_file()
    }

    /// Reads and checks `dir/routing.json`.
    pub fn read(dir: &Path) -> Result<Self, crate::BundleError> {
        let path = dir.join(ROUTING_FILE);
        let bytes = std::fs::read(&path).map_err(|source| crate::BundleError::ReadManifest {
            path: path.clone(),
            source,
        })?;
        let m: RoutingManifest =
            serde_json::from_slice(&bytes).map_err(|source| crate::BundleError::ParseManifest {
                path: path.clone(),
                source,
            })?;
        let invalid = |reason: String| crate::BundleError::InvalidManifest {
            path: path.clone(),
            reason,
        };
        if m.format_version != ROUTED_FORMAT_VERSION {
            return Err(invalid(format!(
                "routed bundle format {} (this SDK reads {ROUTED_FORMAT_VERSION})",
                m.format_version
            )));
        }
        m.rule.validate().map_err(invalid)?;
        if m.selector_size_multiple == 0 {
            return Err(invalid("selector_size_multiple must be positive".into()));
        }
        Ok(m)
    }
}

/// A segmentation and how it was routed.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutedSegmentation {
    pub segmentation: crate::Segmentation,
    pub route: Route,
}

/// A routed bundle loaded into ONNX Runtime: the selector, the global and the personalised model.
#[derive(Debug)]
pub struct RoutedSegmenter {
    routing: RoutingManifest,
    selector: SiteSelectorModel,
    global: crate::Segmenter,
    personalised: crate::Segmenter,
}

impl RoutedSegmenter {
    /// Opens a routed bundle: `routing.json`, the selector (checksum checked) and both bundles.
    pub fn open_with(
        dir: impl AsRef<Path>,
        options: &SegmenterOptions,
    ) -> Result<Self, SegmentError> {
        let dir = dir.as_ref();
        let routing = RoutingManifest::read(dir)?;
        let path = dir.join(SELECTOR_FILE);
        let model = std::fs::read(&path).map_err(|source| crate::BundleError::ReadModel {
            path: path.clone(),
            source,
        })?;
        let found = crate::bundle::sha256_hex(&model);
        if found != routing.selector_sha256 {
            return Err(crate::BundleError::ModelChecksum {
                path,
                expected: routing.selector_sha256.clone(),
                found,
            }
            .into());
        }
        let selector =
            SiteSelectorModel::from_bytes(&model, &path, routing.rule.sites.len(), options)?;
        let global = crate::Segmenter::open_with(dir.join(GLOBAL_DIR), options)?;
        let personalised = crate::Segmenter::open_with(dir.join(PERSONALISED_DIR), options)?;
        Ok(RoutedSegmenter {
            routing,
            selector,
            global,
            personalised,
        })
    }

    /// The routing manifest.
    pub fn routing(&self) -> &RoutingManifest {
        &self.routing
    }

    /// The segmenter of one of the two models.
    pub fn segmenter(&self, model: RoutedModel) -> &crate::Segmenter {
        match model {
            RoutedModel::Personalised => &self.personalised,
            RoutedModel::Global => &self.global,
        }
    }

    /// Where a volume would be routed: the selector on every slice (normalised with the global
    /// model's manifest normalisation), pooled by [`pool_log_mean`], then the rule.
    pub fn route(&self, volume: &Volume<f32>) -> Result<Route, SegmentError> {
        let per_slice = self.selector.volume_slice_probabilities(
            volume,
            &self.global.manifest().normalisation,
            self.routing.selector_size_multiple,
        )?;
        Ok(self
            .routing
            .rule
            .route(pool_log_mean(&per_slice, self.selector.sites())))
    }

    /// Routes a volume and segments it with the chosen model.
    pub fn segment(&self, volume: &Volume<f32>) -> Result<RoutedSegmentation, SegmentError> {
        let route = self.route(volume)?;
        let segmentation = self.segmenter(route.model).segment(volume)?;
        Ok(RoutedSegmentation {
            segmentation,
            route,
        })
    }
}

/// One segmentation model of a routed bundle, to write.
#[derive(Debug, Clone, Copy)]
pub struct ModelFiles<'a> {
    pub model: &'a [u8],
    pub manifest: &'a crate::Manifest,
}

/// Writes a routed bundle to `dir` (new or empty): the two model bundles
/// ([`crate::bundle::write`] each), `selector.onnx` and `routing.json` (the selector's checksum
/// filled in), in a temporary directory renamed into place with everything fsynced.
pub fn write_routed(
    dir: &Path,
    global: ModelFiles,
    personalised: ModelFiles,
    selector_model: &[u8],
    rule: &RoutingRule,
    selector_size_multiple: usize,
) -> Result<RoutingManifest, crate::BundleError> {
    use cosilo_hardware::durable;
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| crate::BundleError::Write { path, source }
    };
    let routing = RoutingManifest {
        format_version: ROUTED_FORMAT_VERSION,
        rule: rule.clone(),
        selector_sha256: crate::bundle::sha256_hex(selector_model),
        selector_size_multiple,
    };
    let routing_path = dir.join(ROUTING_FILE);
    routing
        .rule
        .validate()
        .map_err(|reason| crate::BundleError::InvalidManifest {
            path: routing_path.clone(),
            reason,
        })?;
    if std::fs::read_dir(dir).is_ok_and(|mut e| e.next().is_some()) {
        return Err(crate::BundleError::Exists {
            path: dir.to_path_buf(),
        });
    }
    let name = dir.file_name().ok_or_else(|| {
        werr(dir)(std::io::Error::other(
            "the bundle path has no final component",
        ))
    })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(werr(&parent))?;
    let tmp = parent.join(format!(
        ".{}.routed-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        std::fs::create_dir(&tmp).map_err(werr(&tmp))?;
        crate::bundle::write(tmp.join(GLOBAL_DIR), global.model, global.manifest)?;
        crate::bundle::write(
            tmp.join(PERSONALISED_DIR),
            personalised.model,
            personalised.manifest,
        )?;
        let sel = tmp.join(SELECTOR_FILE);
        durable::write_synced(&sel, selector_model).map_err(werr(&sel))?;
        let json = serde_json::to_vec_pretty(&routing).unwrap_or_default();
        let rpath = tmp.join(ROUTING_FILE);
        durable::write_synced(&rpath, &json).map_err(werr(&rpath))?;
        durable::sync_dir(&tmp).map_err(werr(&tmp))?;
        std::fs::rename(&tmp, dir).map_err(werr(dir))?;
        durable::sync_dir(&parent).map_err(werr(&parent))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| routing)
}
