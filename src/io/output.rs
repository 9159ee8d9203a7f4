//! Every file and directory the engine writes goes through this module
//! (docs/DESIGN.md §10):
//!
//! - Written under a temporary sibling `.<name>.rku-tmp-<pid>-<n>`, created
//!   exclusively (`create_new`, i.e. `O_EXCL`, for a file; `create_dir` for
//!   a directory), so that nothing planted at that name, a symbolic link
//!   least of all, is ever followed; renamed into place when complete.
//! - An existing destination is replaced only with `force`, and even then
//!   only when it is not, does not contain and does not lie inside one of
//!   the run's inputs ([`protect`]), and when it is empty or an earlier
//!   output of the same [`Kind`]. A destination that is a symbolic link is
//!   replaced as a link, never through it.
//! - Temporary siblings left by runs that no longer exist (killed, crashed)
//!   are removed when the next run writes the same destination.
//!
//! Bytes and paths only: what an output holds is the caller's business.
//!
//! Why one long file: every rule about writing lives here, each in one
//! function, so no command can write around it; about a quarter is the
//! unit tests of those rules.
use crate::{Error, Result};
use serde_json::Value;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The file every output directory holds: `{"engine", "version", "kind"}`.
pub const MARKER: &str = "rku-engine-output.json";
const ENGINE: &str = "rku-engine";
/// Most bytes of a jsonl line, a marker file or a safetensors header read
/// while deciding what an existing file is.
const MAX_LINE: u64 = 64 << 20;
const MAX_MARKER: u64 = 64 << 10;
const MAX_HEADER: u64 = 100 << 20;
/// Temporary names tried before giving up (each taken one is skipped).
const TRIES: u32 = 1000;

/// What an output is, which says how an earlier one is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory holding [`MARKER`] with this `kind`.
    Dir(&'static str),
    /// A safetensors file whose `__metadata__` has this `format`.
    Safetensors(&'static str),
    /// A jsonl file whose every line is a JSON object with these fields.
    Jsonl(&'static [&'static str]),
}

/// A model directory (`import`, `prune`).
pub const MODEL_DIR: Kind = Kind::Dir("model");
/// A report directory (`report`), written in place and resumed.
pub const REPORT_DIR: Kind = Kind::Dir("report");
/// A progressive pruning's directory (`prune --progressive`), written in
/// place and resumed: one model directory and traces file per step.
pub const PROGRESSIVE_DIR: Kind = Kind::Dir("progressive");

impl Kind {
    fn describe(self) -> String {
        match self {
            Kind::Dir(k) => format!("an rku-engine {k} directory"),
            Kind::Safetensors(f) => format!("a safetensors file of format `{f}`"),
            Kind::Jsonl(_) => "an rku-engine record file (jsonl)".into(),
        }
    }
}

// ---- the run's inputs ------------------------------------------------------

/// A path the run reads: as given (absolute, its last component not
/// followed) and where it leads.
struct Input {
    shown: PathBuf,
    given: PathBuf,
    real: PathBuf,
}

static INPUTS: Mutex<Vec<Input>> = Mutex::new(Vec::new());

/// Registers a path the run reads (a model directory, a data, calibration
/// or statistics file): from now on no output of this process may be it,
/// contain it or lie inside it when replacing. A directory's entries are
/// registered too, so that a model whose files are symbolic links (a
/// Hugging Face cache) protects the files they lead to. A path that does
/// not exist protects nothing.
pub fn protect(path: &Path) {
    let mut paths = vec![path.to_path_buf()];
    if fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        if let Ok(rd) = fs::read_dir(path) {
            paths.extend(rd.flatten().map(|e| e.path()));
        }
    }
    let mut inputs = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    for p in paths {
        let (Ok(real), Ok(given)) = (fs::canonicalize(&p), absolute(&p)) else {
            continue;
        };
        inputs.push(Input {
            shown: p,
            given,
            real,
        });
    }
}

/// How `abs` (absolute, last component not followed) meets an input.
fn input_conflict(abs: &Path) -> Option<String> {
    let inputs = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    for i in inputs.iter() {
        for p in [&i.given, &i.real] {
            let how = if abs == p {
                "is"
            } else if p.starts_with(abs) {
                "contains"
            } else if abs.starts_with(p) {
                "lies inside"
            } else {
                continue;
            };
            return Some(format!("it {how} the input {}", i.shown.display()));
        }
    }
    None
}

// ---- paths -----------------------------------------------------------------

/// `p`'s parent (`.` for a bare name) and its last component; errs on a
/// path with no name (``, `.`, `..`, `/`).
fn split(p: &Path) -> Result<(PathBuf, OsString)> {
    let name = p
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{:?} is not a usable output path", p)))?;
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_os_string()))
}

/// `p` made absolute with every existing ancestor resolved, its last
/// component not followed (a symbolic link there stays itself).
fn absolute(p: &Path) -> Result<PathBuf> {
    let (parent, name) = split(p)?;
    let mut rest = Vec::new();
    let mut cur = parent;
    loop {
        if let Ok(mut real) = fs::canonicalize(&cur) {
            real.extend(rest.iter().rev());
            real.push(&name);
            return Ok(real);
        }
        match (cur.file_name(), cur.parent()) {
            (Some(n), Some(up)) => {
                rest.push(n.to_os_string());
                cur = if up.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    up.to_path_buf()
                };
            }
            _ => return std::path::absolute(p).map_err(|e| Error::io(p, e)),
        }
    }
}

// ---- what an existing destination is --------------------------------------

/// Errs, naming `dest`, unless it may be replaced as an output of `kind`:
/// it does not exist; or `force` is given and it is not, does not contain
/// and does not lie inside an input, and it is a symbolic link (replaced
/// as a link), empty, or an earlier output of `kind`. Called before a run
/// does its work, and again just before its output replaces `dest`.
pub fn check(dest: &Path, kind: Kind, force: bool) -> Result<()> {
    let abs = absolute(dest)?;
    let meta = match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dest, e)),
        Ok(m) => m,
    };
    let link = meta.file_type().is_symlink();
    if !force {
        return Err(exists(dest, link));
    }
    if let Some(why) = input_conflict(&abs) {
        return Err(Error::Invalid(format!(
            "--force will not replace {}: {why} of this run",
            dest.display()
        )));
    }
    if link || is_empty(dest, &meta) {
        return Ok(());
    }
    recognise(dest, &meta, kind).map_err(|why| {
        Error::Invalid(format!(
            "--force will not replace {}: {why}, so it is not {} that an earlier run wrote; \
             remove it yourself or choose another --out",
            dest.display(),
            kind.describe()
        ))
    })
}

/// The refusal of an existing `dest` without force.
fn exists(dest: &Path, link: bool) -> Error {
    Error::Invalid(if link {
        format!(
            "{} already exists as a symbolic link (pass --force to replace the link itself; \
             what it points to is never written)",
            dest.display()
        )
    } else {
        format!(
            "{} already exists (pass --force to replace it)",
            dest.display()
        )
    })
}

fn is_empty(path: &Path, meta: &fs::Metadata) -> bool {
    if meta.is_dir() {
        fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
    } else {
        meta.is_file() && meta.len() == 0
    }
}

/// Ok when `path` (not a link) is an output of `kind`; else why not.
fn recognise(path: &Path, meta: &fs::Metadata, kind: Kind) -> std::result::Result<(), String> {
    match kind {
        Kind::Dir(want) => {
            if !meta.is_dir() {
                return Err("it is not a directory".into());
            }
            match read_marker(path)? {
                Some(k) if k == want => foreign_entries(path),
                Some(k) => Err(format!("its {MARKER} says it is a {k} directory")),
                None => Err(format!("it has no {MARKER}")),
            }
        }
        Kind::Safetensors(want) => {
            if !meta.is_file() {
                return Err("it is not a regular file".into());
            }
            match safetensors_format(path) {
                Some(f) if f == want => Ok(()),
                Some(f) => Err(format!("its format is `{f}`")),
                None => Err("it is not a safetensors file with a `format`".into()),
            }
        }
        Kind::Jsonl(fields) => {
            if !meta.is_file() {
                return Err("it is not a regular file".into());
            }
            records_file(path, fields)
        }
    }
}

/// Ok unless `dir` (an output directory of the engine) holds entries its
/// marker's `files` does not list: files put there since, which replacing
/// the directory would delete. Markers written before the list existed
/// list nothing, and are taken as they are.
fn foreign_entries(dir: &Path) -> std::result::Result<(), String> {
    let text = fs::read(dir.join(MARKER)).map_err(|e| format!("its {MARKER}: {e}"))?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| format!("its {MARKER}: {e}"))?;
    let Some(listed) = v["files"].as_array() else {
        return Ok(());
    };
    let listed: std::collections::HashSet<&str> = listed.iter().filter_map(Value::as_str).collect();
    let present = entries(dir).map_err(|e| format!("it cannot be listed ({e})"))?;
    let foreign: Vec<&String> = present
        .iter()
        .filter(|e| e.as_str() != MARKER && !listed.contains(e.as_str()))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = foreign.iter().take(5).map(|e| e.as_str()).collect();
    let more = match foreign.len() - shown.len() {
        0 => String::new(),
        k => format!(" and {k} more"),
    };
    Err(format!(
        "it holds {}{more}, which this tool did not write there; move {} out first",
        shown.join(", "),
        if foreign.len() == 1 { "it" } else { "them" }
    ))
}

/// Every entry under `dir`, files and directories, as paths relative to
/// it joined by '/', sorted; links are listed, not followed.
fn entries(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), String::new())];
    while let Some((at, prefix)) = todo.pop() {
        for e in fs::read_dir(&at)? {
            let e = e?;
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.file_type()?.is_dir() {
                todo.push((e.path(), format!("{name}/")));
            }
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// The `kind` in `dir`'s marker; `None` without one; Err for a marker
/// that is not a regular file of the engine's JSON.
fn read_marker(dir: &Path) -> std::result::Result<Option<String>, String> {
    let path = dir.join(MARKER);
    match fs::symlink_metadata(&path) {
        Err(_) => return Ok(None),
        Ok(m) if !m.is_file() || m.len() > MAX_MARKER => {
            return Err(format!("its {MARKER} is not a small regular file"))
        }
        Ok(_) => {}
    }
    let bad = || format!("its {MARKER} is not the engine's");
    let text = fs::read(&path).map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&text).map_err(|_| bad())?;
    match (v["engine"].as_str(), v["kind"].as_str()) {
        (Some(ENGINE), Some(k)) => Ok(Some(k.to_string())),
        _ => Err(bad()),
    }
}

/// `__metadata__.format` of a safetensors file, read from its header alone.
fn safetensors_format(path: &Path) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len.saturating_sub(8) {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: Value = serde_json::from_slice(&header).ok()?;
    v["__metadata__"]["format"].as_str().map(str::to_string)
}

/// Ok when every line of `path` is a JSON object with every one of `fields`.
fn records_file(path: &Path, fields: &[&str]) -> std::result::Result<(), String> {
    let f = File::open(path).map_err(|e| format!("it cannot be read ({e})"))?;
    let mut r = BufReader::new(f);
    match r.fill_buf() {
        Ok(b) if b.first() == Some(&b'{') => {}
        _ => return Err("its line 1 is not a JSON object".into()),
    }
    let mut line = Vec::new();
    for n in 1.. {
        line.clear();
        let got = (&mut r)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("it cannot be read ({e})"))?;
        if got == 0 {
            break;
        }
        if got as u64 == MAX_LINE && line.last() != Some(&b'\n') {
            return Err(format!("its line {n} is longer than any record"));
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let v: Value = serde_json::from_slice(text)
            .map_err(|_| format!("its line {n} is not a JSON object"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| format!("its line {n} is not a JSON object"))?;
        if let Some(f) = fields.iter().find(|f| !obj.contains_key(**f)) {
            return Err(format!("its line {n} has no field `{f}`"));
        }
    }
    Ok(())
}

// ---- temporary names and stale ones ----------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `.<name>.rku-tmp-`, the name as text cut to 200 bytes (so that the
/// temporary name stays under the usual 255-byte limit).
fn temp_prefix(name: &OsStr) -> String {
    let name = name.to_string_lossy();
    let mut cut = name.len().min(200);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(".{}.rku-tmp-", &name[..cut])
}

/// Creates a fresh temporary sibling in `parent` with `make`, skipping
/// names that exist (whatever they are: nothing there is followed).
fn claim<T>(
    parent: &Path,
    name: &OsStr,
    make: impl Fn(&Path) -> std::io::Result<T>,
) -> Result<(PathBuf, T)> {
    let prefix = temp_prefix(name);
    let pid = std::process::id();
    for _ in 0..TRIES {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = parent.join(format!("{prefix}{pid}-{n}"));
        match make(&p) {
            Ok(t) => return Ok((p, t)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    Err(Error::Invalid(format!(
        "{}: no free temporary name beside it after {TRIES} tries",
        parent.join(name).display()
    )))
}

/// Whether process `pid` exists. Without /proc (not Linux) every process
/// counts as alive, so nothing is removed.
fn alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    pid == std::process::id() || !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// The pid in a temporary sibling's name of `name`: `.<name>.rku-tmp-<pid>-<n>`
/// or the older `.<name>.partial-<pid>`.
fn temp_owner(entry: &str, name: &OsStr) -> Option<u32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if let Some(rest) = entry.strip_prefix(temp_prefix(name).as_str()) {
        let (pid, n) = rest.split_once('-')?;
        return (digits(pid) && digits(n)).then(|| pid.parse().ok())?;
    }
    let rest = entry.strip_prefix(&format!(".{}.partial-", name.to_string_lossy()))?;
    digits(rest).then(|| rest.parse().ok())?
}

/// Removes `path` without following it: a directory tree, or one entry.
fn remove_any(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path)?.is_dir() {
        true => fs::remove_dir_all(path),
        false => fs::remove_file(path),
    }
}

/// Removes the temporary siblings of `name` in `parent` whose run is gone.
fn remove_stale(parent: &Path, name: &OsStr) {
    let Ok(rd) = fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let entry = e.file_name();
        match temp_owner(&entry.to_string_lossy(), name) {
            Some(pid) if !alive(pid) => {
                let path = e.path();
                match remove_any(&path) {
                    Ok(()) => crate::progress::println(&format!(
                        "removed {}, left by an earlier run (pid {pid}) that ended before finishing",
                        path.display()
                    )),
                    Err(err) => crate::progress::println(&format!(
                        "could not remove {}, left by an earlier run: {err}",
                        path.display()
                    )),
                }
            }
            _ => {}
        }
    }
}

/// Creates `dest`'s parent and clears stale temporaries beside `dest`.
fn prepare(dest: &Path) -> Result<(PathBuf, OsString)> {
    let (parent, name) = split(dest)?;
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    remove_stale(&parent, &name);
    Ok((parent, name))
}

/// Removes a temporary path when dropped unless disarmed.
struct Temp(Option<PathBuf>);

impl Temp {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = remove_any(&p);
        }
    }
}

/// Puts the finished `tmp` at `dest` (checked again first), replacing what
/// is there without following it: a file over a file or link directly
/// (one rename); otherwise the old entry is first renamed aside, then
/// removed once the new one is in place.
fn install(tmp: &Path, dest: &Path, kind: Kind, force: bool) -> Result<()> {
    check(dest, kind, force)?;
    let rename = |from: &Path, to: &Path| fs::rename(from, to).map_err(|e| Error::io(to, e));
    let tmp_is_dir = fs::symlink_metadata(tmp).is_ok_and(|m| m.is_dir());
    let old = match fs::symlink_metadata(dest) {
        Err(_) if !force && !tmp_is_dir => {
            // A hard link never replaces: what appeared at `dest` since
            // the check stays (where the file system has hard links).
            return match fs::hard_link(tmp, dest) {
                Ok(()) => {
                    let _ = fs::remove_file(tmp); // else removed as stale later
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let link = fs::symlink_metadata(dest).is_ok_and(|m| m.is_symlink());
                    Err(exists(dest, link))
                }
                Err(_) => rename(tmp, dest),
            };
        }
        Err(_) => return rename(tmp, dest),
        Ok(m) => m,
    };
    if !tmp_is_dir && !old.is_dir() {
        return rename(tmp, dest);
    }
    let (parent, name) = split(dest)?;
    // A placeholder of the old entry's type, which the rename replaces.
    let (aside, ()) = match old.is_dir() {
        true => claim(&parent, &name, |p| fs::create_dir(p))?,
        false => claim(&parent, &name, |p| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
                .map(drop)
        })?,
    };
    let mut aside_guard = Temp(Some(aside.clone()));
    rename(dest, &aside)?;
    if let Err(e) = rename(tmp, dest) {
        aside_guard.disarm(); // the old entry is never removed unless replaced
        return Err(match fs::rename(&aside, dest) {
            Ok(()) => e,
            Err(_) => Error::Invalid(format!(
                "{e}; what was at {} is now at {}",
                dest.display(),
                aside.display()
            )),
        });
    }
    drop(aside_guard); // removes the old entry
    Ok(())
}

// ---- writing ---------------------------------------------------------------

/// A directory being written under a temporary name. Dropped without
/// [`OutputDir::commit`], it is removed.
pub struct OutputDir {
    tmp: Temp,
    dest: PathBuf,
    kind: Kind,
    force: bool,
}

impl OutputDir {
    /// Starts writing `dest`, a directory of `kind` (a [`Kind::Dir`]);
    /// refuses at once what [`check`] refuses.
    pub fn create(dest: &Path, kind: Kind, force: bool) -> Result<Self> {
        if !matches!(kind, Kind::Dir(_)) {
            return Err(Error::Invalid(format!(
                "{}: an output directory needs a directory kind",
                dest.display()
            )));
        }
        check(dest, kind, force)?;
        let (parent, name) = prepare(dest)?;
        let (tmp, ()) = claim(&parent, &name, |p| fs::create_dir(p))?;
        Ok(Self {
            tmp: Temp(Some(tmp)),
            dest: dest.to_path_buf(),
            kind,
            force,
        })
    }

    /// The temporary directory to write files into.
    pub fn path(&self) -> &Path {
        self.tmp.0.as_deref().expect("set until committed")
    }

    /// Writes the marker and moves the finished directory into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        let Kind::Dir(k) = self.kind else {
            unreachable!("checked in create")
        };
        let mut m = marker(k);
        // What the directory holds, so that a later --force can tell
        // files put there since (which it refuses to delete).
        m["files"] = entries(self.path())
            .map_err(|e| Error::io(self.path(), e))?
            .into();
        write_json(&self.path().join(MARKER), &m)?;
        install(self.path(), &self.dest, self.kind, self.force)?;
        self.tmp.disarm();
        Ok(self.dest.clone())
    }
}

fn marker(kind: &str) -> Value {
    serde_json::json!({
        "engine": ENGINE,
        "version": env!("CARGO_PKG_VERSION"),
        "kind": kind,
    })
}

/// Writes `bytes` as the file `dest`, an output of `kind`: refused as
/// [`check`] says, else written to an exclusive temporary sibling, synced,
/// and renamed into place.
pub fn write_file(dest: &Path, kind: Kind, force: bool, bytes: &[u8]) -> Result<()> {
    check(dest, kind, force)?;
    let (tmp, mut guard) = temp_file(dest, bytes)?;
    install(&tmp, dest, kind, force)?;
    guard.disarm();
    Ok(())
}

/// Replaces the file `path` inside a directory this run owns (a report's
/// cells, plots, fingerprint, summaries) through an exclusive temporary
/// sibling: a link at `path` is replaced, not followed; a directory there
/// is refused.
pub fn replace_owned(path: &Path, bytes: &[u8]) -> Result<()> {
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(Error::Invalid(format!(
            "{} is a directory, where the engine writes a file",
            path.display()
        )));
    }
    let (tmp, mut guard) = temp_file(path, bytes)?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    guard.disarm();
    Ok(())
}

/// Removes `path`, an earlier output of `kind` inside a directory this run
/// owns (a step of a progressive pruning that is recomputed), as [`check`]
/// with force allows replacing it: never an input or another kind of
/// output; a link is removed itself, never what it points to. An absent
/// `path` is nothing to do.
pub fn remove_owned(path: &Path, kind: Kind) -> Result<()> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    check(path, kind, true)?;
    remove_any(path).map_err(|e| Error::io(path, e))
}

/// Removes `path` if it is there, when it is an output of `kind` this tool
/// wrote (or an empty directory, or a link: only the link goes), never
/// anything else. Unlike [`remove_owned`] it does not refuse what this run
/// has read since: for an output the run wrote, or [`check`]ed before
/// reading it (a report's pruned model, removed once it is evaluated).
pub fn remove_own_output(path: &Path, kind: Kind) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_symlink() && !is_empty(path, &meta) {
        recognise(path, &meta, kind).map_err(|why| {
            Error::Invalid(format!(
                "will not remove {}: {why}, so it is not {} that this tool wrote",
                path.display(),
                kind.describe()
            ))
        })?;
    }
    remove_any(path).map_err(|e| Error::io(path, e))
}

/// A finished temporary sibling of `dest` holding `bytes`.
fn temp_file(dest: &Path, bytes: &[u8]) -> Result<(PathBuf, Temp)> {
    let (parent, name) = prepare(dest)?;
    let (tmp, mut file) = claim(&parent, &name, |p| {
        OpenOptions::new().write(true).create_new(true).open(p)
    })?;
    let guard = Temp(Some(tmp.clone()));
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    Ok((tmp, guard))
}

/// Writes a new file inside a directory being written (an [`OutputDir`]):
/// refuses anything already at `path`.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))
}

/// Writes a JSON value, pretty-printed, as a new file (see [`write_new`]).
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
    write_new(path, text.as_bytes())
}

/// Whether `path` is `dir` or lies inside it, both resolved as far as they
/// exist (links followed), so that another spelling of the same place counts.
pub fn lies_within(path: &Path, dir: &Path) -> Result<bool> {
    Ok(absolute(path)?.starts_with(absolute(dir)?))
}

/// Makes sure `dir`, a directory inside one this run owns and writes in
/// place (a report's cells/, models/, records/, plots/), is a real
/// directory there: creates it when absent; refuses a symbolic link, whose
/// target this run would write into and remove from, outside the output,
/// and anything else that is not a directory.
pub fn inner_dir(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir(dir).map_err(|e| Error::io(dir, e))
        }
        Err(e) => Err(Error::io(dir, e)),
        Ok(m) if m.file_type().is_symlink() => Err(Error::Invalid(format!(
            "{} is a symbolic link: this run writes and removes files there, and does not \
             follow a link out of its output directory; remove the link",
            dir.display()
        ))),
        Ok(m) if !m.is_dir() => Err(Error::Invalid(format!(
            "{} is not a directory: remove it",
            dir.display()
        ))),
        Ok(_) => Ok(()),
    }
}

/// Opens `dir`, a directory of `kind` written in place and resumed (a
/// report): creates it with its marker when absent; accepts it when it is
/// empty, holds the marker of `kind`, or `legacy(dir)` says an engine
/// wrote it before markers existed (the marker is then added). Refuses,
/// with or without force, a symbolic link, a file, any other directory,
/// and a directory that is, contains or lies inside an input.
pub fn open_in_place(dir: &Path, kind: Kind, legacy: impl Fn(&Path) -> bool) -> Result<()> {
    let Kind::Dir(k) = kind else {
        return Err(Error::Invalid(format!(
            "{}: a directory kind is needed",
            dir.display()
        )));
    };
    let abs = absolute(dir)?;
    if let Some(why) = input_conflict(&abs) {
        return Err(Error::Invalid(format!(
            "--out {} cannot hold this run's output: {why}",
            dir.display()
        )));
    }
    let meta = match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            prepare(dir)?;
            fs::create_dir(dir).map_err(|e| Error::io(dir, e))?;
            return write_json(&dir.join(MARKER), &marker(k));
        }
        Err(e) => return Err(Error::io(dir, e)),
        Ok(m) => m,
    };
    let refuse = |why: String| {
        Err(Error::Invalid(format!(
            "--out {} {why}, not a {k} directory: choose another --out",
            dir.display()
        )))
    };
    if meta.file_type().is_symlink() {
        return refuse("is a symbolic link".into());
    }
    if !meta.is_dir() {
        return refuse("is a file".into());
    }
    match read_marker(dir) {
        Ok(Some(found)) if found == k => Ok(()),
        Ok(Some(found)) => refuse(format!("is a {found} directory")),
        Ok(None) if is_empty(dir, &meta) || legacy(dir) => {
            write_json(&dir.join(MARKER), &marker(k))
        }
        Ok(None) => refuse(format!("exists and has no {MARKER}")),
        Err(why) => refuse(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use std::os::unix::fs::symlink;

    const RECORD: Kind = Kind::Jsonl(&["index", "correct"]);

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn temporary_names_parse_back_to_their_pid() {
        let name = OsStr::new("s.st");
        assert_eq!(temp_owner(".s.st.rku-tmp-42-7", name), Some(42));
        assert_eq!(temp_owner(".s.st.partial-42", name), Some(42));
        for other in [
            ".s.st.rku-tmp-42",
            ".s.st.rku-tmp-x-1",
            ".s.st.rku-tmp-1-1-1",
            ".s.st.partial-",
            ".s.stx.rku-tmp-1-1",
            "s.st",
            ".t.rku-tmp-1-1",
        ] {
            assert_eq!(temp_owner(other, name), None, "{other}");
        }
        let long = "é".repeat(200);
        assert!(temp_prefix(OsStr::new(&long)).len() < 220);
        let made = format!("{}5-9", temp_prefix(OsStr::new(&long)));
        assert_eq!(temp_owner(&made, OsStr::new(&long)), Some(5));
    }

    #[test]
    fn a_file_is_written_once_and_replaced_only_with_force() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("r.jsonl");
        write_file(&p, RECORD, false, b"{\"index\":0,\"correct\":true}\n").unwrap();
        let e = write_file(&p, RECORD, false, b"").unwrap_err().to_string();
        assert!(e.contains("already exists") && e.contains("--force"), "{e}");
        write_file(&p, RECORD, true, b"{\"index\":1,\"correct\":false}\n").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"{\"index\":1,\"correct\":false}\n");
        assert_eq!(names(tmp.path()), ["r.jsonl"]);
        // Not a record file: refused, untouched.
        fs::write(&p, b"{\"index\":1}\n").unwrap();
        let e = write_file(&p, RECORD, true, b"").unwrap_err().to_string();
        assert!(e.contains("no field `correct`"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"{\"index\":1}\n");
        // Empty: replaced.
        fs::write(&p, b"").unwrap();
        write_file(&p, RECORD, true, b"x").unwrap();
        assert_eq!(names(tmp.path()), ["r.jsonl"]);
    }

    #[test]
    fn safetensors_are_recognised_by_their_format() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("s.st");
        let header = br#"{"__metadata__":{"format":"rku-stats"}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        fs::write(&p, &file).unwrap();
        write_file(&p, Kind::Safetensors("rku-stats"), true, &file).unwrap();
        let e = write_file(&p, Kind::Safetensors("other"), true, b"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`rku-stats`"), "{e}");
        fs::write(&p, [0xFFu8; 64]).unwrap();
        assert!(write_file(&p, Kind::Safetensors("rku-stats"), true, b"").is_err());
    }

    #[test]
    fn directories_carry_a_marker_and_replace_only_their_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("m");
        let out = OutputDir::create(&d, MODEL_DIR, false).unwrap();
        fs::write(out.path().join("a"), b"1").unwrap();
        out.commit().unwrap();
        assert_eq!(names(&d), ["a", MARKER]);
        assert!(OutputDir::create(&d, MODEL_DIR, false).is_err());
        let out = OutputDir::create(&d, MODEL_DIR, true).unwrap();
        fs::write(out.path().join("b"), b"2").unwrap();
        out.commit().unwrap();
        assert_eq!(names(&d), ["b", MARKER]);
        let e = OutputDir::create(&d, REPORT_DIR, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("model directory"), "{e}");
        // Dropped without commit: nothing left.
        drop(OutputDir::create(&tmp.path().join("n"), MODEL_DIR, false).unwrap());
        assert_eq!(names(tmp.path()), ["m"]);
        // A foreign directory is refused even with force.
        let f = tmp.path().join("foreign");
        fs::create_dir(&f).unwrap();
        fs::write(f.join("x"), b"keep").unwrap();
        let e = OutputDir::create(&f, MODEL_DIR, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no rku-engine-output.json"), "{e}");
        assert_eq!(names(&f), ["x"]);
    }

    /// Files put into an earlier output directory after it was written are
    /// never deleted by a --force that replaces it: it is refused, naming
    /// them; once they are moved out it is replaced.
    #[test]
    fn force_refuses_a_directory_holding_files_put_there_since() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("m");
        let out = OutputDir::create(&d, MODEL_DIR, false).unwrap();
        fs::create_dir(out.path().join("sub")).unwrap();
        fs::write(out.path().join("sub/a"), b"1").unwrap();
        out.commit().unwrap();
        fs::write(d.join("notes.txt"), b"mine").unwrap();
        fs::write(d.join("sub/keep.txt"), b"mine").unwrap();
        let e = OutputDir::create(&d, MODEL_DIR, true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("notes.txt, sub/keep.txt") && e.contains("did not write"),
            "{e}"
        );
        let e = remove_own_output(&d, MODEL_DIR).unwrap_err().to_string();
        assert!(e.contains("notes.txt"), "{e}");
        assert_eq!(fs::read(d.join("sub/keep.txt")).unwrap(), b"mine");
        fs::remove_file(d.join("notes.txt")).unwrap();
        fs::remove_file(d.join("sub/keep.txt")).unwrap();
        // A file it wrote, removed by hand, is no reason to refuse.
        fs::remove_file(d.join("sub/a")).unwrap();
        OutputDir::create(&d, MODEL_DIR, true)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(names(&d), [MARKER]);
    }

    #[test]
    fn inputs_are_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        let out = OutputDir::create(&model, MODEL_DIR, false).unwrap();
        fs::write(out.path().join("w"), b"weights").unwrap();
        out.commit().unwrap();
        protect(&model);
        for (dest, how) in [
            (model.clone(), "is the input"),
            (model.join("w"), "lies inside"),
            (tmp.path().to_path_buf(), "contains"),
        ] {
            let e = check(&dest, MODEL_DIR, true).unwrap_err().to_string();
            assert!(e.contains(how), "{}: {e}", dest.display());
        }
        assert_eq!(fs::read(model.join("w")).unwrap(), b"weights");
    }

    #[cfg(unix)]
    #[test]
    fn links_are_replaced_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let p = tmp.path().join("out.jsonl");
        // Links planted at the next temporary names this process will try.
        let prefix = temp_prefix(OsStr::new("out.jsonl"));
        let next = COUNTER.load(Ordering::Relaxed);
        for n in next..next + 50 {
            let name = format!("{prefix}{}-{n}", std::process::id());
            symlink(&victim, tmp.path().join(name)).unwrap();
        }
        write_file(&p, RECORD, false, b"{}\n").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&p).unwrap().is_file());
        // A link at the destination: refused without force, replaced itself with.
        let q = tmp.path().join("q.jsonl");
        symlink(&victim, &q).unwrap();
        let e = write_file(&q, RECORD, false, b"new")
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        write_file(&q, RECORD, true, b"new").unwrap();
        assert!(fs::symlink_metadata(&q).unwrap().is_file());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        // A link to a directory, replaced by a directory.
        let vdir = tmp.path().join("vdir");
        fs::create_dir(&vdir).unwrap();
        fs::write(vdir.join("f"), b"keep").unwrap();
        let d = tmp.path().join("d");
        symlink(&vdir, &d).unwrap();
        let out = OutputDir::create(&d, MODEL_DIR, true).unwrap();
        out.commit().unwrap();
        assert!(fs::symlink_metadata(&d).unwrap().is_dir());
        assert_eq!(names(&vdir), ["f"]);
    }

    #[test]
    fn stale_temporaries_of_dead_runs_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join(".m.rku-tmp-999999-0");
        let old = tmp.path().join(".m.partial-999998");
        let mine = tmp
            .path()
            .join(format!(".m.rku-tmp-{}-999", std::process::id()));
        let other = tmp.path().join(".n.rku-tmp-999999-0");
        for d in [&dead, &old, &mine, &other] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("half"), b"x").unwrap();
        }
        OutputDir::create(&tmp.path().join("m"), MODEL_DIR, false)
            .unwrap()
            .commit()
            .unwrap();
        let left = names(tmp.path());
        if Path::new("/proc/self").exists() {
            assert!(!dead.exists() && !old.exists(), "{left:?}");
        }
        assert!(mine.exists() && other.exists(), "{left:?}");
    }

    #[test]
    fn a_report_directory_is_opened_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path().join("r");
        open_in_place(&r, REPORT_DIR, |_| false).unwrap();
        fs::write(r.join("cells"), b"x").unwrap();
        open_in_place(&r, REPORT_DIR, |_| false).unwrap();
        let e = open_in_place(&r, MODEL_DIR, |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("report directory"), "{e}");
        let f = tmp.path().join("f");
        fs::create_dir(&f).unwrap();
        fs::write(f.join("x"), b"x").unwrap();
        assert!(open_in_place(&f, REPORT_DIR, |_| false).is_err());
        open_in_place(&f, REPORT_DIR, |d| d.join("x").exists()).unwrap();
        assert!(f.join(MARKER).exists());
    }
}
