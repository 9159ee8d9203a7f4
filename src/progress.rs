//! Progress reporting: a bar with ETA on a terminal, plain log lines
//! (every 10%) otherwise. Bars live in one process-wide `MultiProgress`, so
//! a loop over evaluations (the report) and the evaluation's own loop show
//! as two stacked bars instead of overwriting each other.
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The terminal's bars; `None` when stderr is not a terminal.
fn bars() -> Option<&'static MultiProgress> {
    static MULTI: OnceLock<Option<MultiProgress>> = OnceLock::new();
    MULTI
        .get_or_init(|| std::io::stderr().is_terminal().then(MultiProgress::new))
        .as_ref()
}

/// Prints a line to stderr above any bars being drawn.
pub fn println(msg: &str) {
    match bars() {
        Some(m) => {
            if m.println(msg).is_err() {
                eprintln!("{msg}");
            }
        }
        None => eprintln!("{msg}"),
    }
}

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    len: u64,
    done: AtomicU64,
    start: Instant,
    /// Shown after the counts (e.g. a throughput), set by [`Progress::note`].
    note: Mutex<String>,
}

impl Progress {
    pub fn new(len: u64, label: &str) -> Self {
        let bar = bars().map(|m| {
            let b = m.add(ProgressBar::new(len));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:40}] {pos}/{len} ({elapsed} < {eta}) {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b
        });
        Self {
            bar,
            label: label.to_string(),
            len,
            done: AtomicU64::new(0),
            start: Instant::now(),
            note: Mutex::new(String::new()),
        }
    }

    /// Text shown after the counts from now on (e.g. "812 tokens/s").
    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(b) => b.set_message(text.to_string()),
            None => *self.note.lock().unwrap_or_else(|e| e.into_inner()) = text.to_string(),
        }
    }

    pub fn inc(&self, n: u64) {
        let before = self.done.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        match &self.bar {
            Some(b) => b.inc(n),
            None => {
                let step = (self.len / 10).max(1);
                if before / step != after / step || after == self.len {
                    let secs = self.start.elapsed().as_secs_f64();
                    let eta = secs / after.max(1) as f64 * (self.len.saturating_sub(after)) as f64;
                    let note = self.note.lock().unwrap_or_else(|e| e.into_inner());
                    let note = if note.is_empty() {
                        String::new()
                    } else {
                        format!(", {note}")
                    };
                    eprintln!(
                        "{}: {after}/{} ({secs:.1}s elapsed, ~{eta:.0}s left{note})",
                        self.label, self.len
                    );
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
            if let Some(m) = bars() {
                m.remove(b);
            }
        }
    }
}
