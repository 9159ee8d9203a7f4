//! The code cites the project's own documents (`docs/METHODS.md`,
//! `docs/DESIGN.md`, `docs/DATA.md`), often by section number. This test
//! reads every text file under src/, kernels/, bench/, tests/ (fixtures
//! excepted), scripts/ and .ci/, plus build.rs and README.md, and fails,
//! naming file:line, for every citation that does not resolve:
//!
//! - a cited document that does not exist under docs/;
//! - a section number the document has no heading for. Recognised forms:
//!   `§N`, `§N–M`, `section N`, `sections N–M` (also with `-` or `—`, and
//!   lists such as `§5, §7` or `sections 5 and 7`), directly after the
//!   document's name, with or without a `docs/` prefix;
//! - a quoted section title directly after the name (`NAME.md, "Title"`)
//!   that is not the title of one of the document's sections.
//!
//! A citation without a number or title ("DESIGN.md's memory discipline")
//! only needs the document to exist. Sections are the document's
//! `## N. Title` headings.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The documents that can be cited.
const DOCS: [&str; 3] = ["METHODS.md", "DESIGN.md", "DATA.md"];

/// Where citations are looked for, relative to the repository root.
const SCANNED_DIRS: [&str; 6] = ["src", "kernels", "bench", "tests", "scripts", ".ci"];
const SCANNED_FILES: [&str; 2] = ["build.rs", "README.md"];
/// Not scanned: generated reference data and its notes.
const SKIPPED_DIRS: [&str; 1] = ["tests/fixtures"];

/// What a citation asks of a document.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// The document only.
    Doc,
    /// These section numbers.
    Sections(Vec<u32>),
    /// A section with this title.
    Title(String),
    /// Something that looked like a section reference but does not parse
    /// as one (e.g. a reversed range `§6–4`).
    Malformed(String),
}

#[derive(Debug, PartialEq, Eq)]
struct Citation {
    doc: &'static str,
    /// 1-based line of the document's name.
    line: usize,
    target: Target,
}

/// A document's sections: number → title.
type Sections = BTreeMap<u32, String>;

/// The `## N. Title` headings of a markdown text.
fn sections(text: &str) -> Sections {
    let mut out = Sections::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("## ") else {
            continue;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Some(title) = rest[digits.len()..].strip_prefix(". ") else {
            continue;
        };
        if let Ok(n) = digits.parse() {
            out.insert(n, title.trim().to_string());
        }
    }
    out
}

/// Skips spaces and tabs, and a line break followed by a comment leader
/// (`//!`, `///`, `//`, `#`, `*`), so a citation broken over two comment
/// lines is read as one.
fn skip_space(s: &str) -> &str {
    let t = s.trim_start_matches([' ', '\t']);
    let Some(next) = t.strip_prefix('\n') else {
        return t;
    };
    let next = next.trim_start_matches([' ', '\t']);
    for leader in ["//!", "///", "//", "#", "*"] {
        if let Some(after) = next.strip_prefix(leader) {
            return after.trim_start_matches([' ', '\t']);
        }
    }
    t
}

/// A number at the start of `s`, and the rest.
fn number(s: &str) -> Option<(u32, &str)> {
    let digits = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let n = s[..digits].parse().ok()?;
    Some((n, &s[digits..]))
}

/// `N` or `N–M` at the start of `s`: the numbers it names, and the rest.
fn number_or_range(s: &str) -> Option<(Result<Vec<u32>, String>, &str)> {
    let (a, rest) = number(s)?;
    for dash in ["–", "—", "-"] {
        if let Some((b, after)) = rest.strip_prefix(dash).and_then(number) {
            let nums = if b >= a {
                Ok((a..=b).collect())
            } else {
                Err(format!("reversed range {a}{dash}{b}"))
            };
            return Some((nums, after));
        }
    }
    Some((Ok(vec![a]), rest))
}

/// A section marker at the start of `s` (`§`, `section `, `sections `, any
/// case), and the rest.
fn section_marker(s: &str) -> Option<&str> {
    if let Some(rest) = s.strip_prefix('§') {
        return Some(rest.trim_start_matches('§').trim_start());
    }
    let lower = s.get(..8).map(str::to_ascii_lowercase);
    if lower.as_deref() == Some("sections") {
        return Some(skip_space(&s[8..]));
    }
    let lower = s.get(..7).map(str::to_ascii_lowercase);
    if lower.as_deref() == Some("section") && s[7..].starts_with([' ', '\t', '\n']) {
        return Some(skip_space(&s[7..]));
    }
    None
}

/// What follows a document's name.
fn target(after: &str) -> Target {
    let s = after.trim_start_matches(',');
    let s = skip_space(s);
    if let Some(rest) = s.strip_prefix('"') {
        if after.starts_with([',', ' ', '\t']) {
            if let Some(end) = rest.find('"') {
                return Target::Title(rest[..end].to_string());
            }
        }
    }
    let Some(mut rest) = section_marker(s) else {
        return Target::Doc;
    };
    let mut nums = Vec::new();
    loop {
        match number_or_range(rest) {
            Some((Ok(ns), after)) => {
                nums.extend(ns);
                rest = after;
            }
            Some((Err(why), _)) => return Target::Malformed(why),
            None if nums.is_empty() => return Target::Doc, // "§N" as a placeholder
            None => break,
        }
        // A list goes on with ", §N", ", N", " and N" (a number must follow).
        let next = rest
            .strip_prefix(", ")
            .or_else(|| rest.strip_prefix(" and "))
            .or_else(|| rest.strip_prefix(" & "));
        match next.map(|n| n.strip_prefix('§').unwrap_or(n)) {
            Some(n) if n.starts_with(|c: char| c.is_ascii_digit()) => rest = n,
            _ => break,
        }
    }
    Target::Sections(nums)
}

/// Every citation of a document in `text`.
fn citations(text: &str) -> Vec<Citation> {
    let mut out = Vec::new();
    for doc in DOCS {
        for (at, _) in text.match_indices(doc) {
            // Part of a longer name ("XDATA.md") is not a citation.
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-') {
                continue;
            }
            out.push(Citation {
                doc,
                line: text[..at].matches('\n').count() + 1,
                target: target(&text[at + doc.len()..]),
            });
        }
    }
    out.sort_by_key(|c| c.line);
    out
}

/// Why `c` does not resolve against `docs` (None: the document is missing).
fn problems(c: &Citation, docs: &BTreeMap<&str, Option<Sections>>) -> Vec<String> {
    let Some(secs) = docs.get(c.doc).and_then(Option::as_ref) else {
        return vec![format!("cites {} but docs/{} does not exist", c.doc, c.doc)];
    };
    match &c.target {
        Target::Doc => Vec::new(),
        Target::Sections(nums) => nums
            .iter()
            .filter(|n| !secs.contains_key(n))
            .map(|n| {
                format!(
                    "cites {} §{n}, which docs/{} has no `## {n}.` heading for (it has {})",
                    c.doc,
                    c.doc,
                    secs.keys()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .collect(),
        Target::Title(t) if secs.values().any(|s| s == t) => Vec::new(),
        Target::Title(t) => vec![format!(
            "cites {} \"{t}\", which is not the title of a section of docs/{}",
            c.doc, c.doc
        )],
        Target::Malformed(why) => vec![format!("cites {} with a {why}", c.doc)],
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir`, recursively, except the skipped directories.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        let rel = p.strip_prefix(root()).unwrap();
        if SKIPPED_DIRS.iter().any(|s| rel == Path::new(s)) {
            continue;
        }
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn load_docs() -> BTreeMap<&'static str, Option<Sections>> {
    DOCS.iter()
        .map(|&d| {
            let text = fs::read_to_string(root().join("docs").join(d)).ok();
            (d, text.as_deref().map(sections))
        })
        .collect()
}

#[test]
fn every_citation_of_the_docs_resolves() {
    let docs = load_docs();
    let mut files = Vec::new();
    for d in SCANNED_DIRS {
        walk(&root().join(d), &mut files);
    }
    files.extend(SCANNED_FILES.iter().map(|f| root().join(f)));
    let mut bad = Vec::new();
    let mut seen = 0;
    for path in &files {
        let Ok(text) = fs::read_to_string(path) else {
            continue; // binary or unreadable: no citations
        };
        let rel = path.strip_prefix(root()).unwrap().display().to_string();
        for c in citations(&text) {
            seen += 1;
            for p in problems(&c, &docs) {
                bad.push(format!("{rel}:{}: {p}", c.line));
            }
        }
    }
    assert!(
        seen > 0,
        "no citation found at all: is the scan looking in the right place?"
    );
    assert!(
        bad.is_empty(),
        "{} citation(s) of the docs do not resolve:\n  {}",
        bad.len(),
        bad.join("\n  ")
    );
}

#[test]
fn every_doc_numbers_its_sections_from_one_without_gaps() {
    for (doc, secs) in load_docs() {
        let Some(secs) = secs else {
            panic!("docs/{doc} does not exist");
        };
        let nums: Vec<u32> = secs.keys().copied().collect();
        let want: Vec<u32> = (1..=nums.len() as u32).collect();
        assert_eq!(nums, want, "docs/{doc}: `## N. Title` headings");
    }
}

// ---- the parser itself, on made-up text ----

/// `doc` joined at run time, so that this file's source holds no
/// citation that the scan above would check.
fn cite(doc: &str, rest: &str) -> String {
    format!("{doc}{rest}")
}

fn targets(text: &str) -> Vec<Target> {
    citations(text).into_iter().map(|c| c.target).collect()
}

#[test]
fn parses_the_citation_forms_in_use() {
    let m = "METHODS.md";
    let cases: [(String, Target); 12] = [
        (cite(m, " §4 (n, s1)"), Target::Sections(vec![4])),
        (cite(m, " §4–6: from"), Target::Sections(vec![4, 5, 6])),
        (cite(m, " §5-6."), Target::Sections(vec![5, 6])),
        (cite(m, " section 2)."), Target::Sections(vec![2])),
        (cite(m, " section 8, `gen`"), Target::Sections(vec![8])),
        (cite(m, " sections 5–7)"), Target::Sections(vec![5, 6, 7])),
        (cite(m, " sections 5 and 7"), Target::Sections(vec![5, 7])),
        (cite(m, " §5, §7."), Target::Sections(vec![5, 7])),
        (cite(m, " Section\n//! 3 says"), Target::Sections(vec![3])),
        (cite("docs/DESIGN.md", " §2"), Target::Sections(vec![2])),
        (cite("DESIGN.md", "'s memory"), Target::Doc),
        (
            cite("DESIGN.md", ", \"Kernels and build.rs\")"),
            Target::Title("Kernels and build.rs".into()),
        ),
    ];
    for (text, want) in cases {
        assert_eq!(targets(&text), vec![want], "{text:?}");
    }
    assert_eq!(targets(&cite(m, " §N–M")), vec![Target::Doc]);
    assert_eq!(targets(&cite("DATA.md", " sentence")), vec![Target::Doc]);
    assert_eq!(
        targets(&cite(m, " §6–4")),
        vec![Target::Malformed("reversed range 6–4".into())]
    );
    // Not citations: a longer file name; a plain mention of a section elsewhere.
    assert!(citations(&cite("XMETHODS.md", " §4")).is_empty());
    let two = format!("a\n{}\nb {}", cite(m, " §1"), cite("DATA.md", ""));
    let lines: Vec<usize> = citations(&two).iter().map(|c| c.line).collect();
    assert_eq!(lines, vec![2, 3]);
}

#[test]
fn a_bad_citation_is_reported() {
    let secs = sections("# T\n\n## 1. One\ntext\n## 2. Two words\n## x. no\n### 3. deeper\n");
    assert_eq!(
        secs.into_iter().collect::<Vec<_>>(),
        vec![(1, "One".to_string()), (2, "Two words".to_string())]
    );
    let docs: BTreeMap<&str, Option<Sections>> = [
        ("METHODS.md", Some(sections("## 1. One\n## 2. Two words\n"))),
        ("DESIGN.md", None),
        ("DATA.md", Some(Sections::new())),
    ]
    .into_iter()
    .collect();
    let report = |text: &str| -> Vec<String> {
        citations(text)
            .iter()
            .flat_map(|c| problems(c, &docs))
            .collect()
    };
    let m = "METHODS.md";
    assert!(report(&cite(m, " §1–2 and section 2")).is_empty());
    assert!(report(&cite(m, ", \"Two words\"")).is_empty());
    let bad = report(&cite(m, " §99"));
    assert_eq!(bad.len(), 1);
    assert!(
        bad[0].contains("§99") && bad[0].contains("has 1, 2"),
        "{bad:?}"
    );
    assert_eq!(report(&cite(m, " sections 1–3")).len(), 1);
    assert_eq!(report(&cite(m, ", \"Three\"")).len(), 1);
    assert_eq!(report(&cite(m, " §2–1")).len(), 1);
    let missing = report(&cite("DESIGN.md", "'s layout"));
    assert_eq!(missing.len(), 1);
    assert!(missing[0].contains("does not exist"), "{missing:?}");
}
