//! Outputs under hostile conditions (docs/DESIGN.md §10), through the
//! binary: every command that writes (score, prune, import, stats merge,
//! eval gen, eval mc, traces, recover; report and prune --progressive,
//! directories resumed in place, where it applies) × planted symbolic links,
//! `--out` naming an input, `--force` over foreign and earlier outputs, and
//! leftovers of killed runs. Every case checks the exit status, that the
//! message names the path (and the flag), and that nothing outside the
//! output changed: the whole test directory (model copy, data, statistics,
//! victims) is snapshotted before and after each run.
#![cfg(unix)]
mod common;
use common::*;
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

const GSM: &str = r#####"{"question": "Shot: 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
{"question": "A farmer has 3 cows and buys 4 more. How many cows?", "answer": "#### 7"}
{"question": "What is 1,000 + 250?", "answer": "#### 1,250"}
"#####;
const MC: &str = r#"{"query": "The train leaves at", "choices": ["noon", "11:05"], "gold": 1}
{"query": "said the", "choices": ["teacher", "train"], "gold": 0}
"#;

/// A scratch tree: a copy of a tiny model, its GGUF, texts, two statistics
/// files, victims for links to point at, and `work/` for outputs.
struct World {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    gguf: PathBuf,
    calib: PathBuf,
    gen: PathBuf,
    shots: PathBuf,
    mc: PathBuf,
    stats_a: PathBuf,
    stats_b: PathBuf,
    victim_file: PathBuf,
    victim_dir: PathBuf,
    work: PathBuf,
}

/// Calibration text; other `words`, other windows (and digest).
fn calib_text(words: &str) -> String {
    (0..300)
        .map(|i| format!("{i}: {words} {}.\n", i * 7))
        .collect()
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let model = root.join("model");
        std::fs::create_dir(&model).unwrap();
        for f in [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(fixture("tiny-qwen2").join(f), model.join(f)).unwrap();
        }
        let gguf = root.join("tiny.gguf");
        std::fs::copy(fixture("gguf/tiny_qwen2.gguf"), &gguf).unwrap();
        let write = |name: &str, text: &str| {
            let p = root.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let calib = write(
            "calib.txt",
            &calib_text("the quick brown fox jumps over the lazy dogs"),
        );
        let calib2 = write(
            "calib2.txt",
            &calib_text("colourless green ideas sleep furiously in rooms"),
        );
        let gen = write("gen.jsonl", GSM);
        let shots = write("shots.jsonl", GSM.lines().next().unwrap());
        let mc = write("mc.jsonl", MC);
        let victim_file = write("victim.txt", "precious");
        let victim_dir = root.join("victim-dir");
        std::fs::create_dir(&victim_dir).unwrap();
        std::fs::write(victim_dir.join("keep.txt"), "precious too").unwrap();
        let work = root.join("work");
        std::fs::create_dir(&work).unwrap();
        std::fs::create_dir(root.join("stats")).unwrap();
        let w = World {
            _tmp: tmp,
            stats_a: root.join("stats/a.safetensors"),
            stats_b: root.join("stats/b.safetensors"),
            root,
            model,
            gguf,
            calib,
            gen,
            shots,
            mc,
            victim_file,
            victim_dir,
            work,
        };
        for (text, out) in [(&w.calib, &w.stats_a), (&calib2, &w.stats_b)] {
            run_ok(&mut w.score(text, out, false));
        }
        w
    }

    fn score(&self, calib: &Path, out: &Path, force: bool) -> Command {
        let mut c = bin();
        c.args(["score", "--backend", "cpu", "--model"])
            .arg(&self.model)
            .arg("--calib")
            .arg(calib)
            .args(["--samples", "2", "--seq-len", "16", "--out"])
            .arg(out);
        if force {
            c.arg("--force");
        }
        c
    }
}

/// Every command that writes an output named by `--out`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cmd {
    Score,
    Prune,
    Import,
    Merge,
    Gen,
    Mc,
    Traces,
    Recover,
}

const ALL: [Cmd; 8] = [
    Cmd::Score,
    Cmd::Prune,
    Cmd::Import,
    Cmd::Merge,
    Cmd::Gen,
    Cmd::Mc,
    Cmd::Traces,
    Cmd::Recover,
];

impl Cmd {
    /// Writes a directory (else a file).
    fn dir(self) -> bool {
        matches!(self, Cmd::Prune | Cmd::Import | Cmd::Recover)
    }

    /// What an earlier output of the command is (commands of one kind may
    /// replace each other's outputs with --force).
    fn kind(self) -> &'static str {
        match self {
            Cmd::Score | Cmd::Merge => "stats",
            Cmd::Prune | Cmd::Import | Cmd::Recover => "model",
            Cmd::Gen => "gen",
            Cmd::Mc => "mc",
            Cmd::Traces => "traces",
        }
    }

    /// A fresh output path in `work/`.
    fn out(self, w: &World, tag: &str) -> PathBuf {
        let ext = match self {
            Cmd::Score | Cmd::Merge => ".safetensors",
            Cmd::Gen | Cmd::Mc | Cmd::Traces => ".jsonl",
            Cmd::Prune | Cmd::Import | Cmd::Recover => "",
        };
        w.work.join(format!("{self:?}-{tag}{ext}").to_lowercase())
    }

    fn command(self, w: &World, out: &Path, force: bool) -> Command {
        let mut c = match self {
            Cmd::Score => return w.score(&w.calib, out, force),
            Cmd::Prune => {
                let mut c = bin();
                c.args(["prune", "--backend", "cpu", "--model"])
                    .arg(&w.model)
                    .arg("--stats")
                    .arg(&w.stats_a)
                    .args(["--method", "rku", "--sparsity", "0.5"]);
                c
            }
            Cmd::Import => {
                let mut c = bin();
                c.arg("import").arg(&w.gguf);
                c
            }
            Cmd::Merge => {
                let mut c = bin();
                c.args(["stats", "merge"]).arg(&w.stats_a).arg(&w.stats_b);
                c
            }
            Cmd::Gen => {
                let mut c = bin();
                c.args(["eval", "gen", "--backend", "cpu", "--model"])
                    .arg(&w.model)
                    .arg("--data")
                    .arg(&w.gen)
                    .arg("--shots-file")
                    .arg(&w.shots)
                    .args(["--shots", "1", "--limit", "1", "--max-new-tokens", "2"]);
                c
            }
            Cmd::Mc => {
                let mut c = bin();
                c.args(["eval", "mc", "--backend", "cpu", "--model"])
                    .arg(&w.model)
                    .arg("--data")
                    .arg(&w.mc)
                    .args(["--limit", "1"]);
                c
            }
            Cmd::Traces => {
                let mut c = bin();
                c.args(["traces", "--backend", "cpu", "--model"])
                    .arg(&w.model)
                    .arg("--prompts")
                    .arg(&w.gen)
                    .arg("--shots-file")
                    .arg(&w.shots)
                    .args(["--shots", "1", "--limit", "1", "--max-new-tokens", "2"]);
                c
            }
            Cmd::Recover => {
                let mut c = bin();
                c.args(["recover", "--backend", "cpu", "--model"])
                    .arg(&w.model)
                    .arg("--teacher")
                    .arg(&w.model)
                    .arg("--data")
                    .arg(&w.calib)
                    .args(["--steps", "1", "--batch", "1", "--seq-len", "8"]);
                c
            }
        };
        c.arg("--out").arg(out);
        if force {
            c.arg("--force");
        }
        c
    }

    /// The command's inputs, each a path an `--out` must never replace.
    fn inputs(self, w: &World) -> Vec<PathBuf> {
        let model = || vec![w.model.clone(), w.model.join("model.safetensors")];
        let with = |mut v: Vec<PathBuf>, more: &[&PathBuf]| {
            v.extend(more.iter().map(|p| p.to_path_buf()));
            v
        };
        match self {
            Cmd::Score => with(model(), &[&w.calib]),
            Cmd::Prune => with(model(), &[&w.model.join("config.json"), &w.stats_a]),
            Cmd::Import => vec![w.gguf.clone()],
            Cmd::Merge => vec![w.stats_a.clone(), w.stats_b.clone()],
            Cmd::Gen => with(
                model(),
                &[&w.gen, &w.shots, &w.model.join("tokenizer.json")],
            ),
            Cmd::Mc => with(model(), &[&w.mc]),
            Cmd::Traces => with(
                model(),
                &[&w.gen, &w.shots, &w.model.join("tokenizer.json")],
            ),
            Cmd::Recover => with(model(), &[&w.calib, &w.model.join("config.json")]),
        }
    }
}

// ---- snapshots --------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Node {
    Dir,
    File(u64),
    Link(PathBuf),
}

/// Everything under `root`, links not followed, file contents hashed.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, Node::Link(std::fs::read_link(&p).unwrap()));
            } else if meta.is_dir() {
                out.insert(rel, Node::Dir);
                walk(root, &p, out);
            } else {
                let mut h = DefaultHasher::new();
                std::fs::read(&p).unwrap().hash(&mut h);
                out.insert(rel, Node::File(h.finish()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The snapshot without `out` and what lies under it.
fn outside(mut s: BTreeMap<PathBuf, Node>, root: &Path, out: &Path) -> BTreeMap<PathBuf, Node> {
    let rel = out.strip_prefix(root).unwrap();
    s.retain(|k, _| !k.starts_with(rel));
    s
}

fn changes(a: &BTreeMap<PathBuf, Node>, b: &BTreeMap<PathBuf, Node>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("removed {}", k.display())),
            Some(w) if w != v => d.push(format!("changed {}", k.display())),
            _ => {}
        }
    }
    d.extend(
        b.keys()
            .filter(|k| !a.contains_key(*k))
            .map(|k| format!("added {}", k.display())),
    );
    d
}

/// Runs `cmd`, which must fail without a panic and change nothing at all
/// under the world; returns its stderr.
fn refused(w: &World, cmd: &mut Command) -> String {
    let before = snapshot(&w.root);
    let e = run_err(cmd);
    let after = snapshot(&w.root);
    assert!(
        before == after,
        "{cmd:?} was refused but changed {:?}\n{e}",
        changes(&before, &after)
    );
    e
}

/// Runs `cmd`, which must succeed, change nothing outside `out` except
/// `expect_removed`, and leave no temporary of its own beside `out`.
fn written(w: &World, cmd: &mut Command, out: &Path, expect_removed: &[PathBuf]) {
    let mut before = outside(snapshot(&w.root), &w.root, out);
    for p in expect_removed {
        before.retain(|k, _| !w.root.join(k).starts_with(p));
    }
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let after = outside(snapshot(&w.root), &w.root, out);
    assert!(
        before == after,
        "{cmd:?} changed {:?} outside {}",
        changes(&before, &after),
        out.display()
    );
    let parent = out.parent().unwrap();
    let mine = format!("rku-tmp-{pid}-");
    let stray: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            let old = n.ends_with(".tmp-write") || n.ends_with(".partial");
            let planted =
                std::fs::symlink_metadata(parent.join(n)).is_ok_and(|m| m.file_type().is_symlink());
            n.contains(&mine) || (old && !planted)
        })
        .collect();
    assert!(stray.is_empty(), "{cmd:?} left {stray:?}");
    let meta = std::fs::symlink_metadata(out).unwrap();
    assert!(
        !meta.file_type().is_symlink(),
        "{} is still a link",
        out.display()
    );
    assert_eq!(meta.is_dir(), out.is_dir());
}

fn says(e: &str, needles: &[&str]) {
    for n in needles {
        assert!(e.contains(n), "expected {n:?} in: {e}");
    }
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

// ---- cases ------------------------------------------------------------------

#[test]
fn a_link_at_the_destination_is_refused_then_replaced_never_followed() {
    let w = World::new();
    for cmd in ALL {
        let out = cmd.out(&w, "link");
        let victim = if cmd.dir() {
            &w.victim_dir
        } else {
            &w.victim_file
        };
        symlink(victim, &out).unwrap();
        let e = refused(&w, &mut cmd.command(&w, &out, false));
        says(&e, &[&shown(&out), "symbolic link", "--force"]);
        // With --force the link itself is replaced; the victim is part of
        // the snapshot `written` compares.
        written(&w, &mut cmd.command(&w, &out, true), &out, &[]);
        // A dangling link too.
        let dangling = cmd.out(&w, "dangling");
        symlink(w.root.join("nowhere"), &dangling).unwrap();
        let e = refused(&w, &mut cmd.command(&w, &dangling, false));
        says(&e, &[&shown(&dangling), "--force"]);
        written(&w, &mut cmd.command(&w, &dangling, true), &dangling, &[]);
        assert!(
            !w.root.join("nowhere").exists(),
            "{cmd:?} wrote through a link"
        );
    }
}

#[test]
fn links_at_temporary_names_are_never_followed() {
    let w = World::new();
    for cmd in ALL {
        let out = cmd.out(&w, "tmp");
        let name = out.file_name().unwrap().to_string_lossy().into_owned();
        let victim = if cmd.dir() {
            &w.victim_dir
        } else {
            &w.victim_file
        };
        // The old temporary names, and new-style names of live processes
        // (pid 1 always exists): left alone, never written through.
        let planted: Vec<PathBuf> = [
            format!("{name}.tmp-write"),
            out.with_extension("tmp-write")
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            format!("{name}.partial"),
            format!(".{name}.partial-1"),
            format!(".{name}.rku-tmp-1-0"),
            format!(".{name}.rku-tmp-1-1"),
        ]
        .iter()
        .map(|n| w.work.join(n))
        .collect();
        for p in &planted {
            if !p.exists() {
                symlink(victim, p).unwrap();
            }
        }
        // One of a dead run: the link itself is removed, not what it names.
        let stale = w.work.join(format!(".{name}.rku-tmp-999999-0"));
        symlink(victim, &stale).unwrap();
        written(
            &w,
            &mut cmd.command(&w, &out, false),
            &out,
            std::slice::from_ref(&stale),
        );
        assert!(std::fs::symlink_metadata(&stale).is_err(), "{cmd:?}");
        for p in &planted {
            let m = std::fs::symlink_metadata(p).unwrap();
            assert!(m.file_type().is_symlink(), "{cmd:?}: {}", p.display());
        }
    }
}

#[test]
fn an_input_is_never_replaced() {
    let w = World::new();
    for cmd in ALL {
        for input in cmd.inputs(&w) {
            let e = refused(&w, &mut cmd.command(&w, &input, false));
            says(&e, &[&shown(&input), "already exists", "--force"]);
            let e = refused(&w, &mut cmd.command(&w, &input, true));
            says(&e, &[&shown(&input), "--force", "input"]);
        }
        // The directory holding the model (and every other input).
        let e = refused(&w, &mut cmd.command(&w, &w.root, false));
        says(&e, &[&shown(&w.root), "already exists"]);
        let e = refused(&w, &mut cmd.command(&w, &w.root, true));
        says(&e, &[&shown(&w.root), "--force", "contains the input"]);
    }
}

#[test]
fn inputs_reached_through_links_are_protected() {
    let w = World::new();
    // A model directory of links (like a Hugging Face cache) and data
    // given through a link.
    let linked = w.root.join("linked-model");
    std::fs::create_dir(&linked).unwrap();
    for e in std::fs::read_dir(&w.model).unwrap() {
        let p = e.unwrap().path();
        symlink(&p, linked.join(p.file_name().unwrap())).unwrap();
    }
    let data_link = w.root.join("data-link.jsonl");
    symlink(&w.gen, &data_link).unwrap();
    let gen = |out: &Path| {
        let mut c = bin();
        c.args(["eval", "gen", "--backend", "cpu", "--model"])
            .arg(&linked)
            .arg("--data")
            .arg(&data_link)
            .args([
                "--shots",
                "1",
                "--limit",
                "1",
                "--max-new-tokens",
                "2",
                "--force",
            ])
            .arg("--out")
            .arg(out);
        c
    };
    for out in [
        w.gen.clone(),
        data_link.clone(),
        w.model.join("model.safetensors"),
        linked.join("tokenizer.json"),
    ] {
        let e = refused(&w, &mut gen(&out));
        says(&e, &[&shown(&out), "input"]);
    }
}

#[test]
fn force_replaces_earlier_outputs_of_its_kind_and_nothing_else() {
    let w = World::new();
    // An earlier output of every command.
    let earlier: Vec<(Cmd, PathBuf)> = ALL
        .iter()
        .map(|&cmd| {
            let out = cmd.out(&w, "earlier");
            written(&w, &mut cmd.command(&w, &out, false), &out, &[]);
            (cmd, out)
        })
        .collect();
    for cmd in ALL {
        // Its own earlier output: replaced with --force only (traces
        // resume theirs instead, and are refused when the settings differ).
        let (_, own) = earlier.iter().find(|(c, _)| *c == cmd).unwrap();
        if cmd == Cmd::Traces {
            written(&w, &mut cmd.command(&w, own, false), own, &[]);
            let e = refused(&w, cmd.command(&w, own, false).args(["--temperature", "1"]));
            says(&e, &[&shown(own), "cannot be resumed", "--force"]);
        } else {
            let e = refused(&w, &mut cmd.command(&w, own, false));
            says(&e, &[&shown(own), "already exists", "--force"]);
        }
        written(&w, &mut cmd.command(&w, own, true), own, &[]);
        // Another kind's output, a foreign directory and a foreign file.
        let foreign_dir = cmd.out(&w, "foreign-dir");
        std::fs::create_dir_all(&foreign_dir).unwrap();
        std::fs::write(foreign_dir.join("notes.txt"), "mine").unwrap();
        let foreign_file = cmd.out(&w, "foreign-file");
        std::fs::write(&foreign_file, "{\"not\": \"a record\"}\n").unwrap();
        let others = earlier
            .iter()
            .filter(|(c, _)| c.kind() != cmd.kind())
            .map(|(_, p)| p.clone());
        for victim in others.chain([foreign_dir, foreign_file]) {
            let e = refused(&w, &mut cmd.command(&w, &victim, true));
            says(&e, &[&shown(&victim), "--force will not replace"]);
        }
        // Same kind, another command: replaced.
        if let Some((_, same)) = earlier
            .iter()
            .find(|(c, _)| *c != cmd && c.kind() == cmd.kind())
        {
            written(&w, &mut cmd.command(&w, same, true), same, &[]);
        }
        // Empty ones: replaced.
        let empty_dir = cmd.out(&w, "empty-dir");
        std::fs::create_dir(&empty_dir).unwrap();
        written(&w, &mut cmd.command(&w, &empty_dir, true), &empty_dir, &[]);
        let empty_file = cmd.out(&w, "empty-file");
        std::fs::write(&empty_file, "").unwrap();
        written(
            &w,
            &mut cmd.command(&w, &empty_file, true),
            &empty_file,
            &[],
        );
    }
}

#[test]
fn leftovers_of_dead_runs_are_removed_by_the_next_run() {
    let w = World::new();
    for cmd in ALL {
        let out = cmd.out(&w, "stale");
        let name = out.file_name().unwrap().to_string_lossy().into_owned();
        let stale: Vec<PathBuf> = [
            format!(".{name}.rku-tmp-999999-0"),
            format!(".{name}.partial-999998"),
        ]
        .iter()
        .map(|n| w.work.join(n))
        .collect();
        for d in &stale {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("half-written"), "x").unwrap();
        }
        let other = w.work.join(".unrelated.rku-tmp-999999-0");
        std::fs::create_dir_all(&other).unwrap();
        written(&w, &mut cmd.command(&w, &out, false), &out, &stale);
        for d in &stale {
            assert!(!d.exists(), "{cmd:?} left {}", d.display());
        }
        assert!(other.exists(), "{cmd:?} removed another output's leftovers");
    }
}

#[test]
fn score_over_a_directory_leaves_no_temporary_file() {
    let w = World::new();
    let foreign = w.work.join("dir-out");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("x"), "x").unwrap();
    let e = refused(&w, &mut w.score(&w.calib, &foreign, true));
    says(&e, &[&shown(&foreign), "--force will not replace"]);
    std::fs::remove_file(foreign.join("x")).unwrap();
    written(&w, &mut w.score(&w.calib, &foreign, true), &foreign, &[]);
    assert!(foreign.is_file());
    let names: Vec<_> = std::fs::read_dir(&w.work)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["dir-out"]);
}

/// `report` of the world's model over 2 windows of 16 tokens, RKU at 50%,
/// then `extra` (evaluations), into `out` (with `--force` when `force`).
fn report_cmd(w: &World, out: &Path, force: bool, extra: &[&OsStr]) -> Command {
    let mut c = bin();
    c.args(["report", "--backend", "cpu", "--model"])
        .arg(&w.model)
        .arg("--calib")
        .arg(&w.calib)
        .args(["--samples", "2", "--seq-len", "16", "--methods", "rku"])
        .args(["--sparsity", "0.5", "--no-prefill"])
        .args(extra)
        .arg("--out")
        .arg(out);
    if force {
        c.arg("--force");
    }
    c
}

#[test]
fn report_refuses_a_directory_that_is_not_a_report() {
    let w = World::new();
    let report = |out: &Path, force: bool| report_cmd(&w, out, force, &[]);
    let foreign = w.work.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let link = w.work.join("link");
    symlink(&w.victim_dir, &link).unwrap();
    for force in [false, true] {
        for out in [&foreign, &w.model, &w.root, &w.victim_file, &link] {
            let e = refused(&w, &mut report(out, force));
            says(&e, &[&shown(out), "--out"]);
        }
    }
}

/// A report directory whose cells/, models/, records/ or plots/ has been
/// replaced by a link (to a directory holding an earlier prune output, or
/// anything else) is refused, naming the link, with or without --force:
/// the report writes into and removes from those directories, and must
/// never do so outside its own.
#[test]
fn report_refuses_links_inside_its_directory() {
    let w = World::new();
    let evals: Vec<&OsStr> = [
        "--ppl-text".as_ref(),
        w.calib.as_os_str(),
        "--ppl-seq-len".as_ref(),
        "16".as_ref(),
        "--ppl-max-windows".as_ref(),
        "2".as_ref(),
        "--gen-data".as_ref(),
        w.gen.as_os_str(),
        "--gen-shots".as_ref(),
        "0".as_ref(),
        "--limit".as_ref(),
        "1".as_ref(),
        "--gen-max-new-tokens".as_ref(),
        "2".as_ref(),
    ]
    .to_vec();
    let report = |out: &Path, force: bool| report_cmd(&w, out, force, &evals);
    let out = w.work.join("rep");
    run_ok(&mut report(&out, false));
    // A directory outside the report holding an earlier prune output
    // named as the report's model would be.
    let elsewhere = w.work.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    run_ok(
        bin()
            .args(["prune", "--backend", "cpu", "--model"])
            .arg(&w.model)
            .arg("--stats")
            .arg(&w.stats_a)
            .args(["--method", "rku", "--sparsity", "0.5", "--out"])
            .arg(elsewhere.join("rku-s0.5")),
    );
    std::fs::write(elsewhere.join("rku-s0.5/NOTES.txt"), "mine").unwrap();
    for sub in ["models", "cells", "records", "plots"] {
        let p = out.join(sub);
        let moved = w.work.join(format!("{sub}.real"));
        if p.exists() {
            std::fs::rename(&p, &moved).unwrap();
        }
        symlink(&elsewhere, &p).unwrap();
        for force in [false, true] {
            let e = refused(&w, &mut report(&out, force));
            says(&e, &[&shown(&p), "symbolic link"]);
        }
        std::fs::remove_file(&p).unwrap();
        if moved.exists() {
            std::fs::rename(&moved, &p).unwrap();
        }
    }
    assert_eq!(
        std::fs::read_to_string(elsewhere.join("rku-s0.5/NOTES.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn progressive_refuses_a_directory_that_is_not_its_own() {
    let w = World::new();
    let progressive = |out: &Path, force: bool| {
        let mut c = bin();
        c.args(["prune", "--backend", "cpu", "--model"])
            .arg(&w.model)
            .args(["--progressive", "0.5", "--trace-prompts"])
            .arg(&w.gen)
            .arg("--shots-file")
            .arg(&w.shots)
            .args(["--shots", "1", "--limit", "1", "--max-new-tokens", "2"])
            .arg("--out")
            .arg(out);
        if force {
            c.arg("--force");
        }
        c
    };
    let foreign = w.work.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let link = w.work.join("link");
    symlink(&w.victim_dir, &link).unwrap();
    let pruned = Cmd::Prune.out(&w, "earlier");
    written(
        &w,
        &mut Cmd::Prune.command(&w, &pruned, false),
        &pruned,
        &[],
    );
    for force in [false, true] {
        for out in [&foreign, &w.model, &w.root, &w.victim_file, &link, &pruned] {
            let e = refused(&w, &mut progressive(out, force));
            says(&e, &[&shown(out), "--out"]);
        }
    }
    // Its own directory: written, then resumed (nothing to do).
    let out = w.work.join("progressive");
    written(&w, &mut progressive(&out, false), &out, &[]);
    let step = out.join("step-1-s0.5");
    let before = snapshot(&w.root);
    written(&w, &mut progressive(&out, false), &out, &[]);
    assert_eq!(before, snapshot(&w.root), "a complete run rewrites nothing");
    // A link planted at a step: refused, then replaced itself with --force.
    std::fs::remove_dir_all(&step).unwrap();
    symlink(&w.victim_dir, &step).unwrap();
    let e = refused(&w, &mut progressive(&out, false));
    says(&e, &[&shown(&step), "--force"]);
    written(&w, &mut progressive(&out, true), &out, &[]);
    assert!(!std::fs::symlink_metadata(&step)
        .unwrap()
        .file_type()
        .is_symlink());
    // A foreign directory at a step: refused even with --force.
    std::fs::remove_dir_all(&step).unwrap();
    std::fs::create_dir(&step).unwrap();
    std::fs::write(step.join("notes.txt"), "mine").unwrap();
    for force in [false, true] {
        let e = refused(&w, &mut progressive(&out, force));
        says(&e, &[&shown(&step)]);
    }
}
