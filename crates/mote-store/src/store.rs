//! The store: an OCI image layout directory holding models, their tags and the journal.
//!
//! Layout under the root: `oci-layout`, `index.json`, `blobs/sha256/<hex>` (the OCI part,
//! readable by skopeo and oras), `journal.jsonl`, `tmp/` (blobs being written) and `locks/`.
//!
//! Writers follow one order so that a process killed at any instant leaves a consistent
//! store: blobs (fsynced, renamed into place) → journal entry (fsynced) → `index.json`
//! (atomic replace). `index.json` records the last journal entry it reflects; readers replay
//! any later tag entries, so a crash between the journal and the index loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::blobs::{Blobs, write_atomic};
use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::import::{ImportOptions, plan};
use crate::journal::{Entry, Event, Journal, TagReason};
use crate::oci::{
    ANNOTATION_FILEPATH, ANNOTATION_JOURNAL_SEQ, ANNOTATION_REF_NAME, ANNOTATION_SUBJECT,
    ANNOTATION_TITLE, ARTIFACT_TYPE_MODEL, Descriptor, EMPTY_JSON, Index, MEDIA_TYPE_EMPTY,
    MEDIA_TYPE_MANIFEST, MEDIA_TYPE_MODEL_CONFIG, MEDIA_TYPE_MOTE_SETTINGS,
    MEDIA_TYPE_WEIGHT_CONFIG_RAW, Manifest, ModelConfig, ModelFs, OCI_LAYOUT,
};
use crate::reference::{Reference, TagRef};
use crate::settings::Settings;

/// Environment variable naming the store root.
pub const MOTE_HOME: &str = "MOTE_HOME";

/// A model store rooted at a directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    blobs: Blobs,
    journal: Journal,
}

/// What an import did.
#[derive(Clone, Debug, Serialize)]
pub struct ImportOutcome {
    /// The model's manifest digest (its identity).
    pub digest: Digest,
    /// The tag that now points at it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// What the tag pointed at before, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<Digest>,
    /// Number of files (layers) in the model.
    pub files: usize,
    /// Total bytes of the model's files.
    pub bytes: u64,
}

/// A tag move.
#[derive(Clone, Debug, Serialize)]
pub struct TagMove {
    /// `name:tag`.
    pub tag: String,
    /// Previous digest.
    pub from: Option<Digest>,
    /// New digest.
    pub to: Digest,
}

/// One file of a model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelFile {
    /// Path inside the model (`org.cncf.model.filepath`), or `(mote settings)`.
    pub path: String,
    /// Layer media type.
    pub media_type: String,
    /// Content digest.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Where the (read-only) blob is on disk.
    #[serde(skip)]
    pub blob: PathBuf,
}

/// Everything known about one model, as `mote inspect` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// Manifest digest.
    pub digest: Digest,
    /// Tags pointing at it.
    pub tags: Vec<String>,
    /// The ModelPack config.
    pub config: ModelConfig,
    /// mote's settings.
    pub settings: Settings,
    /// The model's files (layers), settings last.
    pub files: Vec<ModelFile>,
    /// Sum of file sizes.
    pub total_size: u64,
    /// Manifests in the store whose subject is this model (audit reports, ...).
    pub referrers: Vec<Descriptor>,
}

impl ModelInfo {
    /// A file by its path inside the model.
    pub fn file(&self, path: &str) -> Option<&ModelFile> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// A model of the store whose files are verified against their digests: all of them at
/// once by [`Store::verify`], or each as it is used after [`Store::open_model`].
///
/// Whatever [`VerifiedModel::read`] and [`VerifiedModel::map`] hand out was hashed as it was
/// handed out, so a caller gets exactly the verified bytes even if the blob changed on disk
/// in between; [`VerifiedModel::verify_unread`] hashes the files nobody has read, so that a
/// load verifies every file of the model and hashes each once.
#[derive(Clone, Debug)]
pub struct VerifiedModel {
    /// Description of the model.
    pub info: ModelInfo,
    /// Paths of the files whose bytes were hashed (shared by clones).
    hashed: Arc<Mutex<BTreeSet<String>>>,
}

impl VerifiedModel {
    fn new(info: ModelInfo, hashed: BTreeSet<String>) -> VerifiedModel {
        VerifiedModel {
            info,
            hashed: Arc::new(Mutex::new(hashed)),
        }
    }

    fn mark(&self, path: &str) {
        self.hashed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path.to_string());
    }

    /// Read one file of the model, checking its digest as it is read (so what the caller
    /// gets is exactly what was verified, even if the blob changed since).
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let (model, file) = self.file(path)?;
        let bytes = fs::read(&file.blob).at("cannot read", &file.blob)?;
        Self::check(model, path, file, &bytes)?;
        self.mark(path);
        Ok(bytes)
    }

    /// Hash every file of the model that [`VerifiedModel::read`] and [`VerifiedModel::map`]
    /// have not: after a load has read what it uses, this completes the check of the whole
    /// artifact (each file hashed once).
    pub fn verify_unread(&self) -> Result<()> {
        for file in &self.info.files {
            let done = self
                .hashed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&file.path);
            if done {
                continue;
            }
            let (model, _) = self.file(&file.path)?;
            let f = File::open(&file.blob).at("cannot open", &file.blob)?;
            let (actual, _) = Digest::of_reader(f).at("cannot read", &file.blob)?;
            if actual != file.digest {
                return Err(StoreError::Corrupt {
                    model,
                    file: file.path.clone(),
                    expected: file.digest,
                    actual,
                });
            }
            self.mark(&file.path);
        }
        Ok(())
    }

    /// Memory-map one file of the model read-only, checking the digest of the mapped bytes
    /// (so the pages the caller uses are the ones that were verified). Large weights are
    /// shared between processes through the page cache instead of copied.
    ///
    /// Blobs are read-only files that mote never rewrites in place; a process that
    /// truncates one behind mote's back while it is mapped makes reads fault (SIGBUS).
    pub fn map(&self, path: &str) -> Result<Mapped> {
        let (model, file) = self.file(path)?;
        let f = File::open(&file.blob).at("cannot open", &file.blob)?;
        if file.size == 0 {
            Self::check(model, path, file, &[])?;
            self.mark(path);
            return Ok(Mapped(MappedInner::Empty));
        }
        // SAFETY: the blob is a read-only (0444) content-addressed file that the store only
        // ever creates by rename and removes by unlink, never modifies in place; the map is
        // read-only and private, and its contents are hashed below before anyone uses them.
        let map = unsafe { memmap2::Mmap::map(&f) }.at("cannot memory-map", &file.blob)?;
        Self::check(model, path, file, &map)?;
        self.mark(path);
        Ok(Mapped(MappedInner::Map(map)))
    }

    fn file(&self, path: &str) -> Result<(String, &ModelFile)> {
        let model = match self.info.tags.first() {
            Some(t) => format!("{t} ({})", self.info.digest),
            None => self.info.digest.to_string(),
        };
        let file = self.info.file(path).ok_or_else(|| StoreError::Damaged {
            path: PathBuf::from(path),
            reason: format!("model {model} has no file {path:?}; re-import it"),
        })?;
        Ok((model, file))
    }

    fn check(model: String, path: &str, file: &ModelFile, bytes: &[u8]) -> Result<()> {
        let actual = Digest::of(bytes);
        if actual != file.digest {
            return Err(StoreError::Corrupt {
                model,
                file: path.to_string(),
                expected: file.digest,
                actual,
            });
        }
        Ok(())
    }
}

/// A model file mapped into memory by [`VerifiedModel::map`], verified against its digest.
#[derive(Debug)]
pub struct Mapped(MappedInner);

#[derive(Debug)]
enum MappedInner {
    Empty,
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Mapped {
    /// Bytes already in memory, standing in for a mapped file (fuzzing, tests): nothing
    /// verifies them.
    pub fn from_bytes(bytes: Vec<u8>) -> Mapped {
        Mapped(MappedInner::Owned(bytes))
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            MappedInner::Empty => &[],
            MappedInner::Map(m) => m,
            MappedInner::Owned(v) => v,
        }
    }
}

/// The verification of one model by [`Store::verify_all`].
#[derive(Debug)]
pub struct VerifyOutcome {
    /// Manifest digest.
    pub digest: Digest,
    /// Tags pointing at it.
    pub tags: Vec<String>,
    /// The verified model, or what is wrong with it.
    pub result: Result<VerifiedModel>,
}

/// A listed model.
#[derive(Clone, Debug, Serialize)]
pub struct ListedModel {
    /// Manifest digest.
    pub digest: Digest,
    /// Tags pointing at it (empty when untagged).
    pub tags: Vec<String>,
    /// Task, when the settings could be read.
    pub task: Option<String>,
    /// Format, when the settings could be read.
    pub format: Option<String>,
    /// Total size of its files.
    pub size: u64,
    /// Set when the manifest, config or settings could not be read back intact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One tag move in a tag's history.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryItem {
    /// Journal sequence number.
    pub seq: u64,
    /// When.
    pub time: String,
    /// Who.
    pub user: String,
    /// Previous digest.
    pub from: Option<Digest>,
    /// New digest (`None` when the tag was removed).
    pub to: Option<Digest>,
    /// `import`, `tag`, `rollback`, `commit` or `untag`.
    pub reason: String,
}

/// A file to store in an artifact attached to a model ([`Store::attach`]).
#[derive(Clone, Debug)]
pub struct ArtifactFile {
    /// File name (the layer's `org.opencontainers.image.title`).
    pub name: String,
    /// Layer media type.
    pub media_type: String,
    /// Content.
    pub bytes: Vec<u8>,
}

/// An artifact whose subject is a model (e.g. an audit report).
#[derive(Clone, Debug, Serialize)]
pub struct Referrer {
    /// Its manifest digest.
    pub digest: Digest,
    /// Its `artifactType`.
    pub artifact_type: String,
    /// Its manifest annotations.
    pub annotations: BTreeMap<String, String>,
    /// Its files (layers), named by their title.
    pub files: Vec<ModelFile>,
}

/// What `gc` removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Blobs deleted.
    pub blobs: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Leftover temp files of interrupted writes deleted.
    pub temp_files: u64,
}

/// What `rm` removed.
#[derive(Clone, Debug, Serialize)]
pub struct Removed {
    /// Tags removed.
    pub tags: Vec<String>,
    /// The model removed from the index, if a digest was given.
    pub model: Option<Digest>,
}

/// A held lock; released when dropped (the file is closed).
struct Lock(#[allow(dead_code)] File);

impl Store {
    /// The root named by `$MOTE_HOME`, else the platform data directory (`~/.local/share/mote`).
    pub fn default_root() -> Result<PathBuf> {
        if let Some(home) = std::env::var_os(MOTE_HOME).filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(home));
        }
        dirs::data_dir()
            .map(|d| d.join("mote"))
            .ok_or_else(|| StoreError::Damaged {
                path: PathBuf::from("~"),
                reason: "no data directory is known for this user; set MOTE_HOME".into(),
            })
    }

    /// Open the store at `root`, creating an empty one if the directory is missing or empty.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root: PathBuf = root.into();
        let layout = root.join("oci-layout");
        if !layout.exists() && root.is_dir() {
            let non_empty = fs::read_dir(&root)
                .at("cannot list", &root)?
                .filter_map(|e| e.ok())
                .any(|e| {
                    // `locks`, `blobs` and `tmp` are the first things another process creating
                    // this store at the same moment makes, before its oci-layout.
                    let name = e.file_name();
                    !name.to_string_lossy().starts_with('.')
                        && !["locks", "blobs", "tmp"].iter().any(|n| name == *n)
                });
            // Another process may have finished creating the store between the check above
            // and the listing: its oci-layout is written before anything else we would see.
            if non_empty && !layout.exists() {
                return Err(StoreError::Damaged {
                    path: root,
                    reason: "the directory is not empty and has no oci-layout file, so it is not a mote store; point MOTE_HOME at an empty or new directory".into(),
                });
            }
        }
        let store = Store {
            blobs: Blobs::new(&root),
            journal: Journal::new(root.join("journal.jsonl")),
            root,
        };
        for dir in [
            store.blobs.dir(),
            store.blobs.tmp_dir(),
            &store.root.join("locks"),
        ] {
            fs::create_dir_all(dir).at("cannot create", dir)?;
        }
        if !layout.exists() || !store.root.join("index.json").exists() {
            let _lock = store.lock_index()?;
            if !layout.exists() {
                write_atomic(&layout, OCI_LAYOUT.as_bytes())?;
            }
            let index_path = store.root.join("index.json");
            if !index_path.exists() {
                write_atomic(&index_path, &serialize_index(&Index::default()))?;
            }
        }
        let text = fs::read_to_string(&layout).at("cannot read", &layout)?;
        if !text.contains("\"imageLayoutVersion\"") {
            return Err(StoreError::Damaged {
                path: layout,
                reason: "oci-layout does not declare an imageLayoutVersion".into(),
            });
        }
        Ok(store)
    }

    /// Open the default store (see [`Store::default_root`]).
    pub fn open_default() -> Result<Store> {
        Store::open(Store::default_root()?)
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn lock(&self, name: &str, exclusive: bool) -> Result<Lock> {
        let path = self.root.join("locks").join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at("cannot open lock file", &path)?;
        if exclusive {
            file.lock().at("cannot lock", &path)?;
        } else {
            file.lock_shared().at("cannot lock", &path)?;
        }
        Ok(Lock(file))
    }

    /// Held while index.json and the journal change.
    fn lock_index(&self) -> Result<Lock> {
        self.lock("index.lock", true)
    }

    /// Shared by writers of new blobs, exclusive for `gc`.
    fn lock_blobs(&self, exclusive: bool) -> Result<Lock> {
        self.lock("blobs.lock", exclusive)
    }

    fn read_index_file(&self) -> Result<Index> {
        let path = self.root.join("index.json");
        let bytes = fs::read(&path).at("cannot read", &path)?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Damaged {
            path,
            reason: format!("index.json does not parse: {e}"),
        })
    }

    /// The current index: `index.json` plus any journal entries it does not reflect yet.
    /// With `strict`, a broken journal is an error; otherwise the index is taken as it is.
    fn state(&self, strict: bool) -> Result<(Index, Vec<Entry>)> {
        let mut index = self.read_index_file()?;
        let entries = match self.journal.entries() {
            Ok(e) => e,
            Err(e) if strict => return Err(e),
            Err(_) => return Ok((index, Vec::new())),
        };
        let applied: u64 = index
            .annotations
            .get(ANNOTATION_JOURNAL_SEQ)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        for entry in entries.iter().filter(|e| e.seq > applied) {
            apply(&mut index, &entry.event);
        }
        if let Some(last) = entries.last() {
            index
                .annotations
                .insert(ANNOTATION_JOURNAL_SEQ.into(), last.seq.to_string());
        }
        Ok((index, entries))
    }

    /// Journal `events` and apply them to the index, atomically with respect to other
    /// writers. `check` sees the current index first and may refuse.
    fn commit(
        &self,
        check: impl FnOnce(&Index, &[Entry]) -> Result<Vec<Event>>,
    ) -> Result<Vec<Entry>> {
        let _lock = self.lock_index()?;
        let (mut index, entries) = self.state(true)?;
        let events = check(&index, &entries)?;
        let mut last = entries.last().cloned();
        let mut written = Vec::new();
        for event in events {
            let entry = self.journal.append(last.as_ref(), event)?;
            apply(&mut index, &entry.event);
            last = Some(entry.clone());
            written.push(entry);
        }
        if let Some(last) = &last {
            index
                .annotations
                .insert(ANNOTATION_JOURNAL_SEQ.into(), last.seq.to_string());
        }
        write_atomic(&self.root.join("index.json"), &serialize_index(&index))?;
        Ok(written)
    }

    /// Record an event against a model (server start, audit, federated round, ...).
    pub fn record(
        &self,
        kind: &str,
        subject: Option<Digest>,
        detail: serde_json::Value,
    ) -> Result<Entry> {
        let mut entries = self.commit(|_, _| {
            Ok(vec![Event::Record {
                kind: kind.to_string(),
                subject,
                detail,
            }])
        })?;
        Ok(entries.remove(0))
    }

    /// Import a model from `source` (a `.onnx` or `.gguf` file, or a model directory),
    /// optionally pointing `tag` at it.
    pub fn import(
        &self,
        source: &Path,
        tag: Option<&TagRef>,
        options: &ImportOptions,
    ) -> Result<ImportOutcome> {
        let plan = plan(source, options)?;
        let _blobs = self.lock_blobs(false)?;
        let mut layers = Vec::with_capacity(plan.files.len() + 1);
        let mut bytes = 0u64;
        for file in &plan.files {
            let f = File::open(&file.source).at("cannot open", &file.source)?;
            let (digest, size) = self.blobs.put_reader(BufReader::new(f), &file.source)?;
            bytes += size;
            layers.push(Descriptor {
                media_type: file.media_type.to_string(),
                digest,
                size,
                artifact_type: None,
                annotations: BTreeMap::from([
                    (ANNOTATION_FILEPATH.to_string(), file.path.clone()),
                    (ANNOTATION_TITLE.to_string(), file.path.clone()),
                ]),
            });
        }
        layers.push(self.settings_layer(&plan.settings)?);
        let shown = fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
        let outcome = self.commit_model(
            plan.config,
            layers,
            shown.display().to_string(),
            tag,
            TagReason::Import,
        )?;
        Ok(ImportOutcome { bytes, ..outcome })
    }

    /// Write config and manifest for already-stored layers, then journal and tag the model.
    fn commit_model(
        &self,
        mut config: ModelConfig,
        layers: Vec<Descriptor>,
        source: String,
        tag: Option<&TagRef>,
        reason: TagReason,
    ) -> Result<ImportOutcome> {
        config.modelfs = ModelFs {
            kind: "layers".into(),
            diff_ids: layers.iter().map(|l| l.digest).collect(),
        };
        let config_bytes = serde_json::to_vec(&config).expect("config serialises");
        let config_digest = self.blobs.put_bytes(&config_bytes)?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: MEDIA_TYPE_MANIFEST.into(),
            artifact_type: Some(ARTIFACT_TYPE_MODEL.into()),
            config: Descriptor {
                media_type: MEDIA_TYPE_MODEL_CONFIG.into(),
                digest: config_digest,
                size: config_bytes.len() as u64,
                artifact_type: None,
                annotations: BTreeMap::new(),
            },
            layers,
            subject: None,
            annotations: BTreeMap::new(),
        };
        let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest serialises");
        let digest = self.blobs.put_bytes(&manifest_bytes)?;
        let files = manifest.layers.len();
        let bytes = manifest.layers.iter().map(|l| l.size).sum();
        let mut previous = None;
        self.commit(|index, _| {
            let mut events = Vec::new();
            if !index.manifests.iter().any(|m| m.digest == digest) {
                events.push(Event::Import {
                    digest,
                    size: manifest_bytes.len() as u64,
                    artifact_type: ARTIFACT_TYPE_MODEL.into(),
                    source,
                    subject: None,
                });
            }
            if let Some(tag) = tag {
                let from = tagged(index, &tag.to_string());
                previous = from;
                if from != Some(digest) {
                    events.push(Event::Tag {
                        tag: tag.to_string(),
                        from,
                        to: digest,
                        reason,
                    });
                }
            }
            Ok(events)
        })?;
        Ok(ImportOutcome {
            digest,
            tag: tag.map(ToString::to_string),
            previous,
            files,
            bytes,
        })
    }

    /// Resolve a reference to a manifest digest present in the index.
    pub fn resolve(&self, reference: &Reference) -> Result<Digest> {
        let (index, _) = self.state(false)?;
        self.resolve_in(&index, reference)
    }

    fn resolve_in(&self, index: &Index, reference: &Reference) -> Result<Digest> {
        let not_found = || StoreError::NotFound {
            reference: reference.to_string(),
            store: self.root.clone(),
        };
        match reference {
            Reference::Tag(t) => tagged(index, &t.to_string()).ok_or_else(not_found),
            Reference::Digest(d) => index
                .manifests
                .iter()
                .any(|m| m.digest == *d)
                .then_some(*d)
                .ok_or_else(not_found),
            Reference::DigestPrefix(p) => {
                let matches: BTreeSet<Digest> = index
                    .manifests
                    .iter()
                    .filter(|m| m.digest.hex().starts_with(p.as_str()))
                    .map(|m| m.digest)
                    .collect();
                match matches.len() {
                    0 => Err(not_found()),
                    1 => Ok(*matches.iter().next().expect("one match")),
                    count => Err(StoreError::Ambiguous {
                        prefix: reference.to_string(),
                        count,
                    }),
                }
            }
        }
    }

    fn label(index: &Index, digest: &Digest) -> String {
        let tags = tags_of(index, digest);
        match tags.first() {
            Some(t) => format!("{t} ({})", digest),
            None => digest.to_string(),
        }
    }

    fn read_json_blob<T: serde::de::DeserializeOwned>(
        &self,
        model: &str,
        what: &str,
        digest: &Digest,
    ) -> Result<T> {
        let bytes = match self.blobs.read_verified(digest)? {
            Ok(b) => b,
            Err(None) => {
                return Err(StoreError::MissingBlob {
                    model: model.into(),
                    file: what.into(),
                    digest: *digest,
                });
            }
            Err(Some(actual)) => {
                return Err(StoreError::Corrupt {
                    model: model.into(),
                    file: what.into(),
                    expected: *digest,
                    actual,
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Damaged {
            path: self.blobs.path(digest),
            reason: format!("the {what} of model {model} does not parse: {e}"),
        })
    }

    fn info_in(&self, index: &Index, digest: Digest) -> Result<ModelInfo> {
        let model = Self::label(index, &digest);
        let manifest: Manifest = self.read_json_blob(&model, "manifest", &digest)?;
        if manifest.artifact_type.as_deref() != Some(ARTIFACT_TYPE_MODEL) {
            return Err(StoreError::Damaged {
                path: self.blobs.path(&digest),
                reason: format!(
                    "{model} is not a model manifest (artifactType {:?})",
                    manifest.artifact_type
                ),
            });
        }
        let config: ModelConfig = self.read_json_blob(&model, "config", &manifest.config.digest)?;
        let settings_layer = manifest
            .layers
            .iter()
            .find(|l| l.media_type == MEDIA_TYPE_MOTE_SETTINGS)
            .ok_or_else(|| StoreError::Damaged {
                path: self.blobs.path(&digest),
                reason: format!("{model} has no mote settings layer; re-import it with mote"),
            })?;
        let settings: Settings =
            self.read_json_blob(&model, "(mote settings)", &settings_layer.digest)?;
        let files: Vec<ModelFile> = manifest
            .layers
            .iter()
            .map(|l| ModelFile {
                path: l
                    .file_path()
                    .map(str::to_string)
                    .unwrap_or_else(|| "(mote settings)".into()),
                media_type: l.media_type.clone(),
                digest: l.digest,
                size: l.size,
                blob: self.blobs.path(&l.digest),
            })
            .collect();
        let referrers = index
            .manifests
            .iter()
            .filter(|m| m.annotations.get(ANNOTATION_SUBJECT) == Some(&digest.to_string()))
            .cloned()
            .collect();
        Ok(ModelInfo {
            digest,
            tags: tags_of(index, &digest),
            total_size: files.iter().map(|f| f.size).sum(),
            config,
            settings,
            files,
            referrers,
        })
    }

    /// Describe a model (its manifest, config and settings are checked against their digests).
    pub fn inspect(&self, reference: &Reference) -> Result<ModelInfo> {
        let (index, _) = self.state(false)?;
        let digest = self.resolve_in(&index, reference)?;
        self.info_in(&index, digest)
    }

    /// Re-hash every blob of a model. Never modifies the store.
    pub fn verify(&self, reference: &Reference) -> Result<VerifiedModel> {
        let (index, _) = self.state(false)?;
        let digest = self.resolve_in(&index, reference)?;
        self.verify_digest(&index, digest)
    }

    fn verify_digest(&self, index: &Index, digest: Digest) -> Result<VerifiedModel> {
        let info = self.info_in(index, digest)?;
        let model = Self::label(index, &digest);
        for file in &info.files {
            match self.blobs.verify(&file.digest) {
                Ok(size) if size == file.size => {}
                Ok(size) => {
                    return Err(StoreError::Damaged {
                        path: file.blob.clone(),
                        reason: format!(
                            "{model}: {} has {size} bytes where the manifest says {}; re-import the model to restore it",
                            file.path, file.size
                        ),
                    });
                }
                Err(None) => {
                    return Err(StoreError::MissingBlob {
                        model,
                        file: file.path.clone(),
                        digest: file.digest,
                    });
                }
                Err(Some(actual)) => {
                    return Err(StoreError::Corrupt {
                        model,
                        file: file.path.clone(),
                        expected: file.digest,
                        actual,
                    });
                }
            }
        }
        let hashed = info.files.iter().map(|f| f.path.clone()).collect();
        Ok(VerifiedModel::new(info, hashed))
    }

    /// Open a model for use: resolve it and check that every blob it consists of is present
    /// with its recorded size. The bytes are hashed as they are used: [`VerifiedModel::read`]
    /// and [`VerifiedModel::map`] check each file they hand out, and
    /// [`VerifiedModel::verify_unread`] the rest, so a load hashes every file once (where
    /// [`Store::verify`] followed by reads hashed the weights twice).
    pub fn open_model(&self, reference: &Reference) -> Result<VerifiedModel> {
        let (index, _) = self.state(false)?;
        let digest = self.resolve_in(&index, reference)?;
        let info = self.info_in(&index, digest)?;
        let model = Self::label(&index, &digest);
        for file in &info.files {
            let size = match fs::metadata(self.blobs.path(&file.digest)) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StoreError::MissingBlob {
                        model,
                        file: file.path.clone(),
                        digest: file.digest,
                    });
                }
                Err(e) => return Err(e).at("cannot read the metadata of", &file.blob),
            };
            if size != file.size {
                return Err(StoreError::Damaged {
                    path: file.blob.clone(),
                    reason: format!(
                        "{model}: {} has {size} bytes where the manifest says {}; re-import the model to restore it",
                        file.path, file.size
                    ),
                });
            }
        }
        Ok(VerifiedModel::new(info, BTreeSet::new()))
    }

    /// Verify every model in the store; one result per model.
    pub fn verify_all(&self) -> Result<Vec<VerifyOutcome>> {
        let (index, _) = self.state(false)?;
        Ok(digests(&index)
            .into_iter()
            .filter(|d| is_model(&index, d))
            .map(|d| VerifyOutcome {
                digest: d,
                tags: tags_of(&index, &d),
                result: self.verify_digest(&index, d),
            })
            .collect())
    }

    /// Every model in the store, tagged or not.
    pub fn list(&self) -> Result<Vec<ListedModel>> {
        let (index, _) = self.state(false)?;
        Ok(digests(&index)
            .into_iter()
            .filter(|d| is_model(&index, d))
            .map(|d| match self.info_in(&index, d) {
                Ok(info) => ListedModel {
                    digest: d,
                    tags: info.tags,
                    task: Some(info.settings.task.to_string()),
                    format: Some(info.settings.format),
                    size: info.total_size,
                    problem: None,
                },
                Err(e) => ListedModel {
                    digest: d,
                    tags: tags_of(&index, &d),
                    task: None,
                    format: None,
                    size: 0,
                    problem: Some(e.to_string()),
                },
            })
            .collect())
    }

    /// Point `tag` at the model `reference` names.
    pub fn tag(&self, reference: &Reference, tag: &TagRef) -> Result<TagMove> {
        self.move_tag(reference, tag, TagReason::Tag)
    }

    fn move_tag(&self, reference: &Reference, tag: &TagRef, reason: TagReason) -> Result<TagMove> {
        let mut result = None;
        self.commit(|index, _| {
            let to = self.resolve_in(index, reference)?;
            let from = tagged(index, &tag.to_string());
            result = Some(TagMove {
                tag: tag.to_string(),
                from,
                to,
            });
            Ok(if from == Some(to) {
                Vec::new()
            } else {
                vec![Event::Tag {
                    tag: tag.to_string(),
                    from,
                    to,
                    reason,
                }]
            })
        })?;
        Ok(result.expect("commit ran the check"))
    }

    /// Every move of `tag`, oldest first.
    pub fn history(&self, tag: &TagRef) -> Result<Vec<HistoryItem>> {
        let name = tag.to_string();
        Ok(self
            .journal
            .entries()?
            .into_iter()
            .filter_map(|e| {
                let (from, to, reason) = match &e.event {
                    Event::Tag {
                        tag,
                        from,
                        to,
                        reason,
                    } if *tag == name => (
                        *from,
                        Some(*to),
                        serde_json::to_value(reason).ok()?.as_str()?.to_string(),
                    ),
                    Event::Untag { tag, from } if *tag == name => {
                        (Some(*from), None, "untag".into())
                    }
                    _ => return None,
                };
                Some(HistoryItem {
                    seq: e.seq,
                    time: e.time,
                    user: e.user,
                    from,
                    to,
                    reason,
                })
            })
            .collect())
    }

    /// Move `tag` back to the digest it pointed at before its current one. Repeated
    /// rollbacks walk further back through the tag's history.
    pub fn rollback(&self, tag: &TagRef) -> Result<TagMove> {
        let name = tag.to_string();
        let mut result = None;
        self.commit(|index, entries| {
            // The tag's states as a stack: forward moves push, rollbacks pop, untag clears.
            let mut stack: Vec<Digest> = Vec::new();
            for e in entries {
                match &e.event {
                    Event::Tag { tag, to, reason, .. } if *tag == name => {
                        if *reason == TagReason::Rollback {
                            stack.pop();
                        } else {
                            stack.push(*to);
                        }
                    }
                    Event::Untag { tag, .. } if *tag == name => stack.clear(),
                    _ => {}
                }
            }
            let current = tagged(index, &name).ok_or_else(|| StoreError::Rollback {
                tag: name.clone(),
                reason: "the tag does not exist; `mote ls` lists tags".into(),
            })?;
            if stack.len() < 2 {
                return Err(StoreError::Rollback {
                    tag: name.clone(),
                    reason: "it has no earlier digest to go back to (`mote history` shows its moves)".into(),
                });
            }
            let target = stack[stack.len() - 2];
            if !index.manifests.iter().any(|m| m.digest == target) {
                return Err(StoreError::Rollback {
                    tag: name.clone(),
                    reason: format!("its previous model {target} was removed with `mote rm`; import it again and use `mote tag`"),
                });
            }
            result = Some(TagMove {
                tag: name.clone(),
                from: Some(current),
                to: target,
            });
            Ok(vec![Event::Tag {
                tag: name.clone(),
                from: Some(current),
                to: target,
                reason: TagReason::Rollback,
            }])
        })?;
        Ok(result.expect("commit ran the check"))
    }

    /// Remove a tag (`name:tag`), or a whole model with its tags (`sha256:…`). Blobs are
    /// freed by the next [`Store::gc`].
    pub fn remove(&self, reference: &Reference) -> Result<Removed> {
        let mut result = None;
        self.commit(|index, _| {
            let digest = self.resolve_in(index, reference)?;
            let mut events = Vec::new();
            let mut removed = Removed {
                tags: Vec::new(),
                model: None,
            };
            match reference {
                Reference::Tag(t) => {
                    events.push(Event::Untag {
                        tag: t.to_string(),
                        from: digest,
                    });
                    removed.tags.push(t.to_string());
                }
                _ => {
                    for t in tags_of(index, &digest) {
                        events.push(Event::Untag {
                            tag: t.clone(),
                            from: digest,
                        });
                        removed.tags.push(t);
                    }
                    events.push(Event::Remove { digest });
                    // Referrers (audit reports) are about this model and go with it.
                    for r in referrer_digests(index, &digest) {
                        events.push(Event::Remove { digest: r });
                    }
                    removed.model = Some(digest);
                }
            }
            result = Some(removed);
            Ok(events)
        })?;
        Ok(result.expect("commit ran the check"))
    }

    /// Store `content` as a blob and describe it as the layer for the file `path`.
    fn file_layer(&self, path: &str, media_type: &str, content: &[u8]) -> Result<Descriptor> {
        let digest = self.blobs.put_bytes(content)?;
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size: content.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::from([
                (ANNOTATION_FILEPATH.to_string(), path.to_string()),
                (ANNOTATION_TITLE.to_string(), path.to_string()),
            ]),
        })
    }

    /// Store the settings document and describe it as the settings layer.
    fn settings_layer(&self, settings: &Settings) -> Result<Descriptor> {
        let bytes = serde_json::to_vec(settings).expect("settings serialise");
        let digest = self.blobs.put_bytes(&bytes)?;
        Ok(Descriptor {
            media_type: MEDIA_TYPE_MOTE_SETTINGS.into(),
            digest,
            size: bytes.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
        })
    }

    /// Commit a model mote made itself (a federated run's first round, ...) from in-memory
    /// files, with its settings and ModelPack config; optionally tags it. Files become layers
    /// in the order given, written like any import (hash-checked, atomic).
    pub fn create(
        &self,
        files: &[(String, Vec<u8>)],
        settings: &Settings,
        config: ModelConfig,
        source: &str,
        tag: Option<&TagRef>,
    ) -> Result<ImportOutcome> {
        let _blobs = self.lock_blobs(false)?;
        let mut layers = Vec::with_capacity(files.len() + 1);
        let mut bytes = 0u64;
        for (path, content) in files {
            bytes += content.len() as u64;
            layers.push(self.file_layer(path, crate::import::media_type_for(path), content)?);
        }
        layers.push(self.settings_layer(settings)?);
        let outcome =
            self.commit_model(config, layers, source.to_string(), tag, TagReason::Commit)?;
        Ok(ImportOutcome { bytes, ..outcome })
    }

    /// Commit a model derived from `parent` (quantisation, a federated round, ...): the
    /// parent's files with `replace` substituted (by path; new paths are added), its settings
    /// with `provenance` (parent digest filled in), and its config with `tech` applied.
    /// Unchanged files share the parent's blobs. Optionally tags the new model.
    pub fn derive(
        &self,
        parent: &Reference,
        replace: &[(String, Vec<u8>)],
        provenance: crate::settings::Provenance,
        tech: impl FnOnce(&mut crate::oci::ModelTechConfig),
        tag: Option<&TagRef>,
    ) -> Result<ImportOutcome> {
        let (index, _) = self.state(false)?;
        let parent_digest = self.resolve_in(&index, parent)?;
        let info = self.info_in(&index, parent_digest)?;
        let label = Self::label(&index, &parent_digest);
        let manifest: Manifest = self.read_json_blob(&label, "manifest", &parent_digest)?;
        let _blobs = self.lock_blobs(false)?;
        let mut layers = Vec::with_capacity(manifest.layers.len() + replace.len());
        let mut done = BTreeSet::new();
        let mut bytes = 0u64;
        for layer in &manifest.layers {
            if layer.media_type == MEDIA_TYPE_MOTE_SETTINGS {
                continue;
            }
            let path = layer.file_path().unwrap_or_default().to_string();
            match replace.iter().find(|(p, _)| *p == path) {
                Some((_, content)) => {
                    let digest = self.blobs.put_bytes(content)?;
                    bytes += content.len() as u64;
                    let mut l = layer.clone();
                    l.digest = digest;
                    l.size = content.len() as u64;
                    layers.push(l);
                    done.insert(path);
                }
                None => layers.push(layer.clone()),
            }
        }
        for (path, content) in replace.iter().filter(|(p, _)| !done.contains(p)) {
            bytes += content.len() as u64;
            layers.push(self.file_layer(path, MEDIA_TYPE_WEIGHT_CONFIG_RAW, content)?);
        }
        let mut settings = info.settings.clone();
        settings.provenance = Some(crate::settings::Provenance {
            parent: Some(parent_digest),
            ..provenance
        });
        layers.push(self.settings_layer(&settings)?);
        let mut config = info.config.clone();
        tech(&mut config.config);
        let outcome = self.commit_model(
            config,
            layers,
            format!("derived from {parent_digest}"),
            tag,
            TagReason::Commit,
        )?;
        Ok(ImportOutcome { bytes, ..outcome })
    }

    /// Store an artifact about the model `subject` names (an OCI referrer: its manifest's
    /// `subject` is the model manifest), e.g. an audit report. Files become layers in the
    /// order given; `annotations` go on the manifest. Journaled like an import; `mote rm`
    /// of the model removes its referrers too.
    pub fn attach(
        &self,
        subject: &Reference,
        artifact_type: &str,
        files: &[ArtifactFile],
        annotations: BTreeMap<String, String>,
    ) -> Result<Digest> {
        let (index, _) = self.state(false)?;
        let subject_digest = self.resolve_in(&index, subject)?;
        if !is_model(&index, &subject_digest) {
            return Err(StoreError::Damaged {
                path: self.blobs.path(&subject_digest),
                reason: format!("{subject} is not a model; artifacts attach to models"),
            });
        }
        let subject_size = index
            .manifests
            .iter()
            .find(|m| m.digest == subject_digest)
            .map_or(0, |m| m.size);
        let _blobs = self.lock_blobs(false)?;
        let mut layers = Vec::with_capacity(files.len());
        for file in files {
            let digest = self.blobs.put_bytes(&file.bytes)?;
            layers.push(Descriptor {
                media_type: file.media_type.clone(),
                digest,
                size: file.bytes.len() as u64,
                artifact_type: None,
                annotations: BTreeMap::from([(ANNOTATION_TITLE.to_string(), file.name.clone())]),
            });
        }
        let empty = self.blobs.put_bytes(EMPTY_JSON)?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: MEDIA_TYPE_MANIFEST.into(),
            artifact_type: Some(artifact_type.to_string()),
            config: Descriptor {
                media_type: MEDIA_TYPE_EMPTY.into(),
                digest: empty,
                size: EMPTY_JSON.len() as u64,
                artifact_type: None,
                annotations: BTreeMap::new(),
            },
            layers,
            subject: Some(Descriptor {
                media_type: MEDIA_TYPE_MANIFEST.into(),
                digest: subject_digest,
                size: subject_size,
                artifact_type: Some(ARTIFACT_TYPE_MODEL.into()),
                annotations: BTreeMap::new(),
            }),
            annotations,
        };
        let bytes = serde_json::to_vec(&manifest).expect("manifest serialises");
        let digest = self.blobs.put_bytes(&bytes)?;
        self.commit(|index, _| {
            if !index.manifests.iter().any(|m| m.digest == subject_digest) {
                return Err(StoreError::NotFound {
                    reference: subject.to_string(),
                    store: self.root.clone(),
                });
            }
            if index.manifests.iter().any(|m| m.digest == digest) {
                return Ok(Vec::new());
            }
            Ok(vec![Event::Import {
                digest,
                size: bytes.len() as u64,
                artifact_type: artifact_type.to_string(),
                source: format!("attached to {subject_digest}"),
                subject: Some(subject_digest),
            }])
        })?;
        Ok(digest)
    }

    /// The referrers of the model `subject` names (optionally only of `artifact_type`),
    /// oldest first by their creation annotation. Each manifest is checked against its digest.
    pub fn referrers(
        &self,
        subject: &Reference,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>> {
        let (index, _) = self.state(false)?;
        let subject_digest = self.resolve_in(&index, subject)?;
        let mut out = Vec::new();
        for digest in referrer_digests(&index, &subject_digest) {
            let label = format!("referrer {digest} of {subject}");
            let manifest: Manifest = self.read_json_blob(&label, "manifest", &digest)?;
            let kind = manifest.artifact_type.clone().unwrap_or_default();
            if artifact_type.is_some_and(|t| t != kind) {
                continue;
            }
            let files = manifest
                .layers
                .iter()
                .map(|l| ModelFile {
                    path: l
                        .annotations
                        .get(ANNOTATION_TITLE)
                        .cloned()
                        .unwrap_or_default(),
                    media_type: l.media_type.clone(),
                    digest: l.digest,
                    size: l.size,
                    blob: self.blobs.path(&l.digest),
                })
                .collect();
            out.push(Referrer {
                digest,
                artifact_type: kind,
                annotations: manifest.annotations,
                files,
            });
        }
        out.sort_by(|a, b| {
            (a.annotations.get(crate::oci::ANNOTATION_CREATED), a.digest)
                .cmp(&(b.annotations.get(crate::oci::ANNOTATION_CREATED), b.digest))
        });
        Ok(out)
    }

    /// Read one file of a referrer, checking its digest.
    pub fn read_referrer_file(&self, referrer: &Referrer, name: &str) -> Result<Vec<u8>> {
        let file = referrer
            .files
            .iter()
            .find(|f| f.path == name)
            .ok_or_else(|| StoreError::Damaged {
                path: self.blobs.path(&referrer.digest),
                reason: format!("referrer {} has no file {name:?}", referrer.digest),
            })?;
        match self.blobs.read_verified(&file.digest)? {
            Ok(bytes) => Ok(bytes),
            Err(None) => Err(StoreError::MissingBlob {
                model: format!("referrer {}", referrer.digest),
                file: name.into(),
                digest: file.digest,
            }),
            Err(Some(actual)) => Err(StoreError::Corrupt {
                model: format!("referrer {}", referrer.digest),
                file: name.into(),
                expected: file.digest,
                actual,
            }),
        }
    }

    /// Delete blobs no manifest in the index reaches, and temp files of interrupted writes.
    pub fn gc(&self) -> Result<GcReport> {
        let _blobs = self.lock_blobs(true)?;
        let mut report = GcReport::default();
        let mut events = Vec::new();
        {
            let _index = self.lock_index()?;
            let (index, _) = self.state(true)?;
            let mut live: BTreeSet<Digest> = BTreeSet::new();
            for d in digests(&index) {
                live.insert(d);
                // A manifest that cannot be read would keep none of its blobs alive: gc
                // refuses rather than delete the layers of a model it cannot see into.
                let refuse = |why: String| StoreError::Damaged {
                    path: self.blobs.path(&d),
                    reason: format!(
                        "the manifest of {d} {why}, so gc cannot tell which blobs it needs and \
                         deletes nothing; run `mote verify --all`, then restore the model or \
                         remove it with `mote rm {d}`"
                    ),
                };
                let bytes = match self.blobs.read_verified(&d) {
                    Ok(Ok(bytes)) => bytes,
                    Ok(Err(None)) => return Err(refuse("is missing".into())),
                    Ok(Err(Some(actual))) => return Err(refuse(format!("hashes to {actual}"))),
                    Err(e) => return Err(refuse(format!("cannot be read ({e})"))),
                };
                let m = serde_json::from_slice::<Manifest>(&bytes)
                    .map_err(|e| refuse(format!("is not a valid manifest ({e})")))?;
                live.insert(m.config.digest);
                live.extend(m.layers.iter().map(|l| l.digest));
            }
            let dir = self.blobs.dir();
            for entry in fs::read_dir(dir).at("cannot list", dir)? {
                let entry = entry.at("cannot list", dir)?;
                let name = entry.file_name();
                let keep = name
                    .to_str()
                    .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok())
                    .is_some_and(|d| live.contains(&d));
                if !keep {
                    let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(entry.path()).at("cannot delete", entry.path())?;
                    report.blobs += 1;
                    report.bytes += size;
                }
            }
            let tmp = self.blobs.tmp_dir();
            for entry in fs::read_dir(tmp).at("cannot list", tmp)? {
                let entry = entry.at("cannot list", tmp)?;
                fs::remove_file(entry.path()).at("cannot delete", entry.path())?;
                report.temp_files += 1;
            }
            if report.blobs > 0 {
                events.push(Event::Gc {
                    blobs: report.blobs,
                    bytes: report.bytes,
                });
            }
        }
        if !events.is_empty() {
            self.commit(|_, _| Ok(events))?;
        }
        Ok(report)
    }
}

fn serialize_index(index: &Index) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(index).expect("index serialises");
    out.push(b'\n');
    out
}

/// The digest a tag points at.
fn tagged(index: &Index, tag: &str) -> Option<Digest> {
    index
        .manifests
        .iter()
        .find(|m| m.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) == Some(tag))
        .map(|m| m.digest)
}

/// Tags pointing at a digest, sorted.
fn tags_of(index: &Index, digest: &Digest) -> Vec<String> {
    let mut tags: Vec<String> = index
        .manifests
        .iter()
        .filter(|m| m.digest == *digest)
        .filter_map(|m| m.annotations.get(ANNOTATION_REF_NAME).cloned())
        .collect();
    tags.sort();
    tags
}

/// Distinct digests in the index, sorted.
fn digests(index: &Index) -> Vec<Digest> {
    let set: BTreeSet<Digest> = index.manifests.iter().map(|m| m.digest).collect();
    set.into_iter().collect()
}

/// Digests of the referrers whose subject is `subject`.
fn referrer_digests(index: &Index, subject: &Digest) -> Vec<Digest> {
    let subject = subject.to_string();
    let set: BTreeSet<Digest> = index
        .manifests
        .iter()
        .filter(|m| m.annotations.get(ANNOTATION_SUBJECT) == Some(&subject))
        .map(|m| m.digest)
        .collect();
    set.into_iter().collect()
}

fn is_model(index: &Index, digest: &Digest) -> bool {
    index.manifests.iter().any(|m| {
        m.digest == *digest
            && m.artifact_type
                .as_deref()
                .is_none_or(|t| t == ARTIFACT_TYPE_MODEL)
    })
}

/// Apply one journal event to the index. Invariant kept: a digest in the index is listed
/// once per tag, or once without a tag when it has none.
fn apply(index: &mut Index, event: &Event) {
    let entry_for = |index: &Index, digest: &Digest| {
        index
            .manifests
            .iter()
            .find(|m| m.digest == *digest)
            .cloned()
    };
    let drop_untagged_if_tagged = |index: &mut Index, digest: &Digest| {
        let tagged = index
            .manifests
            .iter()
            .any(|m| m.digest == *digest && m.annotations.contains_key(ANNOTATION_REF_NAME));
        if tagged {
            index
                .manifests
                .retain(|m| m.digest != *digest || m.annotations.contains_key(ANNOTATION_REF_NAME));
        }
    };
    let keep_listed = |index: &mut Index, template: Descriptor| {
        if !index.manifests.iter().any(|m| m.digest == template.digest) {
            let mut untagged = template;
            untagged.annotations.remove(ANNOTATION_REF_NAME);
            index.manifests.push(untagged);
        }
    };
    match event {
        Event::Import {
            digest,
            size,
            artifact_type,
            subject,
            ..
        } => {
            if entry_for(index, digest).is_none() {
                index.manifests.push(Descriptor {
                    media_type: MEDIA_TYPE_MANIFEST.into(),
                    digest: *digest,
                    size: *size,
                    artifact_type: Some(artifact_type.clone()),
                    annotations: subject
                        .iter()
                        .map(|s| (ANNOTATION_SUBJECT.to_string(), s.to_string()))
                        .collect(),
                });
            }
        }
        Event::Tag { tag, to, .. } => {
            let Some(template) = entry_for(index, to) else {
                return;
            };
            let old = index
                .manifests
                .iter()
                .position(|m| m.annotations.get(ANNOTATION_REF_NAME) == Some(tag));
            if let Some(pos) = old {
                let previous = index.manifests.remove(pos);
                keep_listed(index, previous);
            }
            let mut new = template;
            new.annotations = BTreeMap::from([(ANNOTATION_REF_NAME.to_string(), tag.clone())]);
            index.manifests.push(new);
            drop_untagged_if_tagged(index, to);
        }
        Event::Untag { tag, .. } => {
            if let Some(pos) = index
                .manifests
                .iter()
                .position(|m| m.annotations.get(ANNOTATION_REF_NAME) == Some(tag))
            {
                let previous = index.manifests.remove(pos);
                keep_listed(index, previous);
            }
        }
        Event::Remove { digest } => index.manifests.retain(|m| m.digest != *digest),
        Event::Gc { .. } | Event::Record { .. } => {}
    }
    index.manifests.sort_by(|a, b| {
        (a.annotations.get(ANNOTATION_REF_NAME), a.digest)
            .cmp(&(b.annotations.get(ANNOTATION_REF_NAME), b.digest))
    });
}
