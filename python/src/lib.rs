//! `cosilo._cosilo`: the native half of the Python package `cosilo`.
//!
//! - The SDK: [`Segmenter`] (a bundle in ONNX Runtime) segments a NumPy volume with its affine,
//!   a NIfTI file or a DICOM series folder, returns labels as NumPy plus the affine, and writes a
//!   DICOM SEG; `read_nifti` / `write_nifti`.
//! - Federations: [`Declaration`] (`federation.toml`, validated) and [`Observer`], a read-only
//!   client of the federation's broker that verifies every message against the roster and
//!   reports presence and per-round metrics.
//!
//! Every error is a `cosilo.CosiloError` whose message is the Rust error chain ("outer: cause:
//! root") and whose `chain` attribute lists the links. Long calls release the GIL.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ndarray::{Array3, ArrayView3};
use numpy::{IntoPyArray, PyArray2, PyArray3, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use cosilo_federation::keys::Roster;
use cosilo_federation::link::{self, Link, LinkConfig, LinkEvent, TlsConfig};
use cosilo_federation::wire::{self, topics, Body};
use cosilo_provision::declaration::Security;
use cosilo_sdk::segment::{Segmenter as RustSegmenter, SegmenterOptions};
use cosilo_sdk::volume::{read_nifti as rs_read_nifti, write_nifti_f32, write_nifti_labels};
use cosilo_sdk::{Geometry, Volume};

create_exception!(
    _cosilo,
    CosiloError,
    PyException,
    "A Cosilo operation failed; the message is the Rust error chain, `chain` its links."
);

/// A Rust error as a `CosiloError` carrying its whole source chain.
fn err(e: &(dyn std::error::Error + 'static)) -> PyErr {
    let mut chain = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !chain.last().is_some_and(|l| l.contains(&text)) {
            chain.push(text);
        }
        source = s.source();
    }
    let message = chain.join(": ");
    let exc = CosiloError::new_err(message);
    Python::attach(|py| {
        let _ = exc.value(py).setattr("chain", chain);
    });
    exc
}

fn fail(message: impl Into<String>) -> PyErr {
    let message = message.into();
    let exc = CosiloError::new_err(message.clone());
    Python::attach(|py| {
        let _ = exc.value(py).setattr("chain", vec![message]);
    });
    exc
}

/// A NumPy (I, J, K) array and a 4×4 affine into a Volume (i fastest, as the SDK stores it).
fn to_volume(data: ArrayView3<'_, f32>, affine: [[f64; 4]; 4]) -> PyResult<Volume<f32>> {
    let (i, j, k) = data.dim();
    let flat: Vec<f32> = data.permuted_axes([2, 1, 0]).iter().copied().collect();
    Volume::new(
        Geometry {
            dims: [i, j, k],
            affine,
        },
        flat,
    )
    .map_err(|e| err(&e))
}

/// A Volume's voxels as an (I, J, K) array.
fn to_array<T: Copy>(v: &Volume<T>) -> Array3<T> {
    let [i, j, k] = v.geometry.dims;
    // The data is i-fastest: a C-order (K, J, I) array, transposed.
    let kji = Array3::from_shape_vec((k, j, i), v.data.clone()).expect("dims match the data");
    kji.permuted_axes([2, 1, 0]).as_standard_layout().to_owned()
}

fn affine_from(a: &PyReadonlyArray2<'_, f64>) -> PyResult<[[f64; 4]; 4]> {
    let a = a.as_array();
    if a.dim() != (4, 4) {
        return Err(fail(format!("the affine must be 4x4, not {:?}", a.dim())));
    }
    let mut out = [[0.0; 4]; 4];
    for (r, row) in out.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = a[[r, c]];
        }
    }
    if out.iter().flatten().any(|v| !v.is_finite()) {
        return Err(fail("the affine holds a non-finite value"));
    }
    Ok(out)
}

fn affine_to_py<'py>(py: Python<'py>, a: &[[f64; 4]; 4]) -> Bound<'py, PyArray2<f64>> {
    let arr = ndarray::Array2::from_shape_fn((4, 4), |(r, c)| a[r][c]);
    arr.into_pyarray(py)
}

type Labels<'py> = (Bound<'py, PyArray3<u8>>, Bound<'py, PyArray2<f64>>);
type Values<'py> = (Bound<'py, PyArray3<f32>>, Bound<'py, PyArray2<f64>>);

/// A segmentation bundle (model.onnx + manifest.json) loaded into ONNX Runtime.
///
/// Segmenter(bundle, ort_library=None, threads=None)
///
/// `ort_library` is the ONNX Runtime shared library (default: `ORT_DYLIB_PATH`, then the
/// places the SDK searches); `threads` its intra-op threads.
#[pyclass(module = "cosilo._cosilo")]
struct Segmenter {
    inner: RustSegmenter,
}

#[pymethods]
impl Segmenter {
    #[new]
    #[pyo3(signature = (bundle, ort_library=None, threads=None))]
    fn new(
        py: Python<'_>,
        bundle: PathBuf,
        ort_library: Option<PathBuf>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let options = SegmenterOptions {
            ort_library,
            intra_threads: threads,
            ..SegmenterOptions::default()
        };
        let inner = py
            .detach(|| RustSegmenter::open_with(&bundle, &options))
            .map_err(|e| err(&e))?;
        Ok(Segmenter { inner })
    }

    /// The class names, background first; a voxel's label is its class's index.
    #[getter]
    fn classes(&self) -> Vec<String> {
        self.inner
            .manifest()
            .classes
            .iter()
            .map(|c| c.name.clone())
            .collect()
    }

    /// The bundle's model name.
    #[getter]
    fn model_name(&self) -> String {
        self.inner.manifest().model_name.clone()
    }

    /// Segments an (I, J, K) float32 volume whose voxel (i, j, k) sits at affine @ (i, j, k, 1)
    /// (RAS millimetres, as nibabel). Returns (labels uint8 (I, J, K), affine).
    fn segment<'py>(
        &self,
        py: Python<'py>,
        volume: PyReadonlyArray3<'py, f32>,
        affine: PyReadonlyArray2<'py, f64>,
    ) -> PyResult<Labels<'py>> {
        let affine = affine_from(&affine)?;
        let vol = to_volume(volume.as_array(), affine)?;
        let seg = py
            .detach(|| self.inner.segment(&vol))
            .map_err(|e| err(&e))?;
        Ok((
            to_array(&seg.labels).into_pyarray(py),
            affine_to_py(py, &seg.labels.geometry.affine),
        ))
    }

    /// Segments a NIfTI file. Returns (labels, affine) on the file's grid.
    fn segment_nifti<'py>(&self, py: Python<'py>, path: PathBuf) -> PyResult<Labels<'py>> {
        let seg = py.detach(|| {
            let vol = rs_read_nifti(&path).map_err(|e| err(&e))?;
            self.inner.segment(&vol).map_err(|e| err(&e))
        })?;
        Ok((
            to_array(&seg.labels).into_pyarray(py),
            affine_to_py(py, &seg.labels.geometry.affine),
        ))
    }

    /// Segments the DICOM image series in `folder`; with `seg_out`, also writes the result
    /// there as a DICOM SEG that references the series. Returns (labels, affine).
    #[pyo3(signature = (folder, seg_out=None))]
    fn segment_dicom<'py>(
        &self,
        py: Python<'py>,
        folder: PathBuf,
        seg_out: Option<PathBuf>,
    ) -> PyResult<Labels<'py>> {
        let labels = py.detach(|| -> PyResult<Volume<u8>> {
            let (seg, series) = self
                .inner
                .segment_dicom_series(&folder)
                .map_err(|e| err(&e))?;
            if let Some(out) = &seg_out {
                self.write_seg_for(&seg.labels, &series, out)?;
            }
            Ok(seg.labels)
        })?;
        Ok((
            to_array(&labels).into_pyarray(py),
            affine_to_py(py, &labels.geometry.affine),
        ))
    }

    /// Writes `labels` (uint8 (I, J, K), on the series' grid) as a DICOM SEG referencing the
    /// image series in `folder`, with this bundle's classes as segments.
    fn write_dicom_seg(
        &self,
        py: Python<'_>,
        labels: PyReadonlyArray3<'_, u8>,
        folder: PathBuf,
        out: PathBuf,
    ) -> PyResult<()> {
        let lab = labels.as_array();
        let (i, j, k) = lab.dim();
        let flat: Vec<u8> = lab.permuted_axes([2, 1, 0]).iter().copied().collect();
        py.detach(|| {
            let series = cosilo_sdk::dicom::read_series_dir(&folder).map_err(|e| err(&e))?;
            if series.volume.geometry.dims != [i, j, k] {
                return Err(fail(format!(
                    "the labels are {:?} voxels, the series in {} {:?}",
                    [i, j, k],
                    folder.display(),
                    series.volume.geometry.dims
                )));
            }
            let vol = Volume::new(series.volume.geometry.clone(), flat).map_err(|e| err(&e))?;
            self.write_seg_for(&vol, &series, &out)
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Segmenter(model={:?}, classes={:?})",
            self.inner.manifest().model_name,
            self.classes()
        )
    }
}

impl Segmenter {
    fn write_seg_for(
        &self,
        labels: &Volume<u8>,
        series: &cosilo_sdk::dicom::SeriesVolume,
        out: &Path,
    ) -> PyResult<()> {
        use cosilo_sdk::dicom::{segments_for_classes, write_seg, AlgorithmInfo};
        let m = self.inner.manifest();
        let segments = segments_for_classes(&m.classes);
        let version = m.model_sha256.get(..16).unwrap_or(&m.model_sha256);
        let algorithm = AlgorithmInfo::new(&m.model_name, version);
        write_seg(labels, series, &segments, &algorithm, out).map_err(|e| err(&e))
    }
}

/// Reads a NIfTI-1 file: (float32 (I, J, K) data, 4x4 affine).
#[pyfunction]
fn read_nifti<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Values<'py>> {
    let v = py.detach(|| rs_read_nifti(&path)).map_err(|e| err(&e))?;
    Ok((
        to_array(&v).into_pyarray(py),
        affine_to_py(py, &v.geometry.affine),
    ))
}

/// Writes an (I, J, K) uint8 (labels) or float32 array with its affine as NIfTI-1 (.nii or
/// .nii.gz).
#[pyfunction]
fn write_nifti(
    py: Python<'_>,
    path: PathBuf,
    data: &Bound<'_, PyAny>,
    affine: PyReadonlyArray2<'_, f64>,
) -> PyResult<()> {
    let affine = affine_from(&affine)?;
    if let Ok(labels) = data.extract::<PyReadonlyArray3<'_, u8>>() {
        let a = labels.as_array();
        let (i, j, k) = a.dim();
        let flat: Vec<u8> = a.permuted_axes([2, 1, 0]).iter().copied().collect();
        let v = Volume::new(
            Geometry {
                dims: [i, j, k],
                affine,
            },
            flat,
        )
        .map_err(|e| err(&e))?;
        return py
            .detach(|| write_nifti_labels(&path, &v))
            .map_err(|e| err(&e));
    }
    if let Ok(values) = data.extract::<PyReadonlyArray3<'_, f32>>() {
        let v = to_volume(values.as_array(), affine)?;
        return py
            .detach(|| write_nifti_f32(&path, &v))
            .map_err(|e| err(&e));
    }
    Err(fail(
        "write_nifti takes a 3-D numpy array of uint8 (labels) or float32",
    ))
}

/// A federation declaration (`federation.toml`), parsed and validated.
///
/// Declaration.load(path) or Declaration.parse(text); invalid files raise CosiloError naming
/// the key and the reason.
#[pyclass(module = "cosilo._cosilo", frozen)]
struct Declaration {
    inner: cosilo_provision::Declaration,
}

#[pymethods]
impl Declaration {
    /// Reads and validates a declaration file.
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        let inner = cosilo_provision::Declaration::load(&path).map_err(|e| err(&e))?;
        Ok(Declaration { inner })
    }

    /// Parses and validates declaration text.
    #[staticmethod]
    fn parse(text: &str) -> PyResult<Self> {
        let inner = cosilo_provision::Declaration::parse(text, "<string>").map_err(|e| err(&e))?;
        Ok(Declaration { inner })
    }

    /// The federation's name.
    #[getter]
    fn name(&self) -> String {
        self.inner.federation.name.clone()
    }

    /// The site ids, in declaration order.
    #[getter]
    fn sites(&self) -> Vec<String> {
        self.inner.site.iter().map(|s| s.id.clone()).collect()
    }

    /// The observer ids.
    #[getter]
    fn observers(&self) -> Vec<String> {
        self.inner.observer.iter().map(|o| o.id.clone()).collect()
    }

    /// The strategy's name (fedavg, braintorrent, gossip-avg, ciil, iil, local).
    #[getter]
    fn strategy(&self) -> String {
        self.inner.strategy_kind().name().to_string()
    }

    /// Rounds, when the declaration sets them.
    #[getter]
    fn rounds(&self) -> Option<u64> {
        self.inner.strategy.rounds
    }

    /// "none", "tls" or "mtls".
    #[getter]
    fn security(&self) -> &'static str {
        match self.inner.federation.security {
            Security::None => "none",
            Security::Tls => "tls",
            Security::Mtls => "mtls",
        }
    }

    /// "embedded" or "mosquitto".
    #[getter]
    fn broker_kind(&self) -> &'static str {
        match self.inner.broker.kind {
            cosilo_provision::declaration::BrokerKind::Embedded => "embedded",
            cosilo_provision::declaration::BrokerKind::Mosquitto => "mosquitto",
        }
    }

    /// The broker's host.
    #[getter]
    fn broker_host(&self) -> String {
        self.inner.broker.host.clone()
    }

    /// The broker's port.
    #[getter]
    fn broker_port(&self) -> u16 {
        self.inner.broker.port
    }

    /// The declaration as TOML.
    fn to_toml(&self) -> String {
        self.inner.to_toml()
    }

    fn __repr__(&self) -> String {
        format!(
            "Declaration(name={:?}, sites={:?}, strategy={:?}, broker={:?}, security={:?})",
            self.name(),
            self.sites(),
            self.strategy(),
            self.broker_kind(),
            self.security()
        )
    }
}

struct ObserverState {
    runtime: tokio::runtime::Runtime,
    link: Option<Link>,
    events: tokio::sync::mpsc::Receiver<LinkEvent>,
    roster: Roster,
    federation: String,
}

/// A read-only client of a federation's broker: every message is verified against the roster
/// (signature, membership) before it is reported.
///
/// Observer(folder, id=None)
///
/// `folder` is an installed member folder (an observer's, or a site's): it holds
/// federation.toml, roster.toml, kit.toml (whose id is used unless `id` is given), and with
/// TLS ca.crt, {id}.crt and tls.key. With security
/// "mtls" the broker lets an observer read only.
#[pyclass(module = "cosilo._cosilo")]
struct Observer {
    state: Mutex<ObserverState>,
}

#[pymethods]
impl Observer {
    #[new]
    #[pyo3(signature = (folder, id=None))]
    fn new(py: Python<'_>, folder: PathBuf, id: Option<String>) -> PyResult<Self> {
        let decl = cosilo_provision::Declaration::load(&folder.join("federation.toml"))
            .map_err(|e| err(&e))?;
        let roster = Roster::load(&folder.join("roster.toml")).map_err(|e| err(&e))?;
        let id = match id {
            Some(id) => id,
            None => {
                let info = cosilo_provision::site::KitInfo::load(&folder).map_err(|e| err(&e))?;
                info.id
            }
        };
        let fed = decl.federation.name.clone();
        let cfg = member_link(
            &decl,
            &folder,
            &id,
            format!("cosilo-{fed}-observer-{id}"),
            true,
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| err(&e))?;
        let filters = vec![topics::presence_all(&fed), topics::metrics_all(&fed)];
        let (link, events) = py
            .detach(|| runtime.block_on(link::connect(&cfg, filters, None)))
            .map_err(|e| err(&e))?;
        Ok(Observer {
            state: Mutex::new(ObserverState {
                runtime,
                link: Some(link),
                events,
                roster,
                federation: fed,
            }),
        })
    }

    /// Waits up to `timeout` seconds for the first event and returns it with every event
    /// already queued, as dicts: {"kind": "connected"|"disconnected"|"presence"|"metrics"|
    /// "refused", "site": ..., ...}. Metrics carry round, model_version, dice (per foreground
    /// class, None where absent), loss and cases; presence carries status, round, model_version
    /// and samples. A message that fails verification is reported as "refused" with the reason.
    #[pyo3(signature = (timeout=1.0))]
    fn poll<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyList>> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| fail("observer lock poisoned"))?;
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let st: &mut ObserverState = &mut state;
        let events: Vec<LinkEvent> = py.detach(|| {
            let mut got = Vec::new();
            if let Ok(Some(e)) = st
                .runtime
                .block_on(async { tokio::time::timeout(timeout, st.events.recv()).await })
            {
                got.push(e);
                while let Ok(e) = st.events.try_recv() {
                    got.push(e);
                }
            }
            got
        });
        let list = PyList::empty(py);
        for e in events {
            let d = PyDict::new(py);
            match e {
                LinkEvent::Connected { .. } => d.set_item("kind", "connected")?,
                LinkEvent::Disconnected { reason } => {
                    d.set_item("kind", "disconnected")?;
                    d.set_item("reason", reason)?;
                }
                LinkEvent::Message { topic, payload, .. } => {
                    if topics::parse(&st.federation, &topic).is_none() {
                        continue;
                    }
                    match wire::open(&payload, &st.roster) {
                        Ok(env) => {
                            d.set_item("site", &env.sender)?;
                            d.set_item("sent_unix_ms", env.sent_unix_ms)?;
                            match env.body {
                                Body::Metrics(m) => {
                                    d.set_item("kind", "metrics")?;
                                    d.set_item("round", m.round)?;
                                    d.set_item("model_version", m.model_version)?;
                                    d.set_item("dice", m.dice)?;
                                    d.set_item("loss", m.loss)?;
                                    d.set_item("cases", m.cases)?;
                                }
                                Body::Presence(p) => {
                                    d.set_item("kind", "presence")?;
                                    d.set_item("status", format!("{:?}", p.status))?;
                                    d.set_item("round", p.round)?;
                                    d.set_item("model_version", p.model_version)?;
                                    d.set_item("samples", p.samples)?;
                                }
                                _ => continue,
                            }
                        }
                        Err(e) => {
                            d.set_item("kind", "refused")?;
                            d.set_item("topic", topic)?;
                            d.set_item("reason", e.to_string())?;
                        }
                    }
                }
            }
            list.append(d)?;
        }
        Ok(list)
    }

    /// Disconnects from the broker.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| fail("observer lock poisoned"))?;
        let st: &mut ObserverState = &mut state;
        py.detach(|| {
            if let Some(link) = st.link.take() {
                st.runtime.block_on(link.close()).map_err(|e| err(&e))?;
            }
            Ok(())
        })
    }
}

/// A link configuration as member `id` whose kit is installed in `folder`.
fn member_link(
    decl: &cosilo_provision::Declaration,
    folder: &Path,
    id: &str,
    client_id: String,
    clean_session: bool,
) -> LinkConfig {
    let mut cfg = LinkConfig::new(decl.broker.host.clone(), decl.broker.port, client_id);
    cfg.max_packet_bytes = decl.broker.max_packet_bytes;
    cfg.clean_session = clean_session;
    if decl.uses_tls() {
        let mtls = decl.federation.security == Security::Mtls;
        cfg.tls = Some(TlsConfig {
            ca_file: folder.join("ca.crt"),
            client_cert: mtls.then(|| folder.join(format!("{id}.crt"))),
            client_key: mtls.then(|| folder.join("tls.key")),
        });
    }
    cfg
}

/// Connects once as the site installed in `folder` (its certificate, the daemon's client id
/// and subscriptions, a persistent session) and disconnects, so the broker queues the
/// federation's messages for the site from now on, even before its `cosilo run` connects.
#[pyfunction]
#[pyo3(signature = (folder, timeout=20.0))]
fn hold_session(py: Python<'_>, folder: PathBuf, timeout: f64) -> PyResult<()> {
    let decl = cosilo_provision::Declaration::load(&folder.join("federation.toml"))
        .map_err(|e| err(&e))?;
    let info = cosilo_provision::site::KitInfo::load(&folder).map_err(|e| err(&e))?;
    let fed = decl.federation.name.clone();
    let cfg = member_link(
        &decl,
        &folder,
        &info.id,
        format!("cosilo-{fed}-{}", info.id),
        false,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(&e))?;
    py.detach(|| {
        runtime.block_on(async {
            let (link, mut events) = link::connect(&cfg, topics::member_filters(&fed), None)
                .await
                .map_err(|e| err(&e))?;
            let wait = Duration::from_secs_f64(timeout.max(0.1));
            let outcome = tokio::time::timeout(wait, async {
                loop {
                    match events.recv().await {
                        Some(LinkEvent::Connected { .. }) => return Ok(()),
                        Some(LinkEvent::Disconnected { reason }) => return Err(reason),
                        Some(_) => continue,
                        None => return Err("the link ended".to_string()),
                    }
                }
            })
            .await;
            let result = match outcome {
                Ok(Ok(())) => Ok(()),
                Ok(Err(reason)) => Err(fail(format!(
                    "{} cannot connect to the broker: {reason}",
                    info.id
                ))),
                Err(_) => Err(fail(format!(
                    "{} got no answer from the broker within {timeout} s",
                    info.id
                ))),
            };
            let _ = link.close().await;
            result
        })
    })
}

/// The native module.
#[pymodule]
fn _cosilo(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CosiloError", m.py().get_type::<CosiloError>())?;
    m.add_class::<Segmenter>()?;
    m.add_class::<Declaration>()?;
    m.add_class::<Observer>()?;
    m.add_function(wrap_pyfunction!(read_nifti, m)?)?;
    m.add_function(wrap_pyfunction!(hold_session, m)?)?;
    m.add_function(wrap_pyfunction!(write_nifti, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
