//! The file source: a YAML file of Services and EndpointSlices, followed as
//! it changes.
//!
//! A file is applied only once it is finished. `kubectl get ... > file`
//! truncates the file first and writes it when the API answers, hundreds of
//! milliseconds later; editors write in several steps. So a read counts only
//! when it is *stable*: the same bytes as a read `QUIET` earlier with no
//! change event in between, and parsing. A file that parses to nothing (the
//! truncated moment, or a deliberate emptying) removes every service only
//! after it has stayed empty for `EMPTY_GRACE`, with a warning; a write in
//! the meantime simply replaces it. A broken file keeps the last good
//! state. `Settler` is that decision, pure; `watch_file` is the I/O.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use notify::{RecursiveMode, Watcher};
use tokio::{
    sync::mpsc::{unbounded_channel, UnboundedReceiver},
    time::timeout,
};
use tracing::{error, warn};

use super::{send, Updates, What};
use crate::source::manifest::{self, Objects};

/// A read counts once the file has not changed for this long (same bytes,
/// no change event).
pub const QUIET: Duration = Duration::from_millis(150);
/// An empty file removes every service only after staying empty this long.
pub const EMPTY_GRACE: Duration = Duration::from_secs(5);

/// Reads and parses the config file. Errors only when the file as a whole
/// cannot be used (unreadable, YAML syntax).
pub fn read_file(path: &Path) -> anyhow::Result<What> {
    parse_text(path, &read_text(path)?).map(into_what)
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))
}

fn parse_text(path: &Path, text: &str) -> anyhow::Result<Objects> {
    manifest::parse(text).with_context(|| format!("config file {}", path.display()))
}

fn into_what(o: Objects) -> What {
    What::File {
        services: o.services,
        slices: o.slices,
        rejections: o.rejections,
    }
}

/// What to do with one read of the file.
#[derive(Debug)]
pub enum Decision {
    /// The file is finished: apply it (with a warning to log, if any).
    Apply(Objects, Option<String>),
    /// Read again after this long, or at the next change event; log the
    /// note, if any.
    Wait(Duration, Option<String>),
    /// The finished file cannot be used: log why, keep the last good state,
    /// and wait for the next change.
    Keep(String),
}

/// Decides when a read of the file is the file (see the module comment).
#[derive(Debug)]
pub struct Settler {
    quiet: Duration,
    empty_grace: Duration,
    /// Since when every stable read was empty.
    empty_since: Option<Instant>,
    /// The state applied last was empty: an empty file is nothing new.
    applied_empty: bool,
}

impl Settler {
    pub fn new(quiet: Duration, empty_grace: Duration) -> Settler {
        Settler {
            quiet,
            empty_grace,
            empty_since: None,
            applied_empty: false,
        }
    }

    /// `read` is the file now (`Err`: unreadable); `before` the read made
    /// `quiet` earlier, if no change event came since.
    pub fn decide(
        &mut self,
        path: &Path,
        now: Instant,
        read: &Result<String, String>,
        before: Option<&Result<String, String>>,
    ) -> Decision {
        if before != Some(read) {
            return Decision::Wait(self.quiet, None);
        }
        let text = match read {
            Ok(text) => text,
            Err(e) => return Decision::Keep(format!("keeping the last good state: {e}")),
        };
        let objects = match parse_text(path, text) {
            Ok(o) => o,
            Err(e) => return Decision::Keep(format!("keeping the last good state: {e:#}")),
        };
        let empty = objects.services.is_empty()
            && objects.slices.is_empty()
            && objects.rejections.is_empty();
        if !empty {
            self.empty_since = None;
            self.applied_empty = false;
            return Decision::Apply(objects, None);
        }
        if self.applied_empty {
            return Decision::Apply(objects, None);
        }
        let since = *self.empty_since.get_or_insert(now);
        let waited = now.duration_since(since);
        if waited >= self.empty_grace {
            self.empty_since = None;
            self.applied_empty = true;
            let warning = format!(
                "config file {} has stayed empty for {} s: removing every service",
                path.display(),
                self.empty_grace.as_secs()
            );
            return Decision::Apply(objects, Some(warning));
        }
        let note = (waited.is_zero()).then(|| {
            format!(
                "config file {} is empty: keeping every service for now (a file being \
                 rewritten is empty for a moment); if it stays empty for {} s, every \
                 service is removed",
                path.display(),
                self.empty_grace.as_secs()
            )
        });
        Decision::Wait(self.empty_grace - waited, note)
    }
}

/// Watches `path` and sends its whole contents at start and after every
/// change, once each version is finished (see the module comment). The
/// first read must succeed (so a missing or broken file stops the agent
/// before it touches the kernel); a later broken version is logged and
/// skipped, and the agent keeps the last good state.
pub fn watch_file(path: PathBuf) -> anyhow::Result<Updates> {
    read_file(&path)?;
    let (tx, rx) = unbounded_channel();
    let (events_tx, events) = unbounded_channel();
    let file_name = path.file_name().map(|n| n.to_os_string());
    // Watch the directory, not the file: a rename over the file replaces
    // the inode a file watch would be bound to.
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            // Our own reads show up as access events: only writes count.
            let write = matches!(
                ev.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Remove(_)
                    | notify::EventKind::Modify(
                        notify::event::ModifyKind::Data(_)
                            | notify::event::ModifyKind::Name(_)
                            | notify::event::ModifyKind::Any
                    )
            );
            if write
                && ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name)
            {
                let _ = events_tx.send(());
            }
        }
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    // Reads start after the watch is in place: no change can fall in between.
    tokio::spawn(async move {
        let _watcher = watcher;
        follow(path, events, tx).await;
    });
    Ok(rx)
}

/// The watch loop: settle each version of the file, send it, wait for the
/// next change.
async fn follow(
    path: PathBuf,
    mut events: UnboundedReceiver<()>,
    tx: tokio::sync::mpsc::UnboundedSender<super::Update>,
) {
    let mut settler = Settler::new(QUIET, EMPTY_GRACE);
    loop {
        let mut before: Option<Result<String, String>> = None;
        loop {
            let read = read_text(&path).map_err(|e| format!("{e:#}"));
            match settler.decide(&path, Instant::now(), &read, before.as_ref()) {
                Decision::Apply(objects, warning) => {
                    if let Some(w) = warning {
                        warn!("{w}");
                    }
                    if !send(&tx, into_what(objects)) {
                        return;
                    }
                    break;
                }
                Decision::Keep(why) => {
                    error!("{why}");
                    break;
                }
                Decision::Wait(after, note) => {
                    if let Some(n) = note {
                        warn!("{n}");
                    }
                    before = Some(read);
                    match timeout(after, events.recv()).await {
                        // Changed: start over, `QUIET` after the last event.
                        Ok(Some(())) => {
                            before = None;
                            if !quiet(&mut events).await {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(_) => {}
                    }
                }
            }
        }
        if events.recv().await.is_none() || !quiet(&mut events).await {
            return;
        }
    }
}

/// Waits until no change event has come for `QUIET`. False if the watcher
/// is gone.
async fn quiet(events: &mut UnboundedReceiver<()>) -> bool {
    loop {
        match timeout(QUIET, events.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 198.18.0.10\n  ports: [{port: 80}]\n";

    fn settler() -> Settler {
        Settler::new(QUIET, EMPTY_GRACE)
    }

    fn ok(s: &str) -> Result<String, String> {
        Ok(s.to_string())
    }

    fn path() -> &'static Path {
        Path::new("/etc/lb/services.yaml")
    }

    #[test]
    fn a_read_counts_once_it_is_repeated_unchanged() {
        let mut s = settler();
        let t = Instant::now();
        assert!(matches!(
            s.decide(path(), t, &ok(WEB), None),
            Decision::Wait(QUIET, None)
        ));
        // A half-written file, then the finished one: not yet.
        assert!(matches!(
            s.decide(path(), t, &ok(WEB), Some(&ok(&WEB[..30]))),
            Decision::Wait(..)
        ));
        match s.decide(path(), t, &ok(WEB), Some(&ok(WEB))) {
            Decision::Apply(o, None) => assert_eq!(o.services.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_broken_or_missing_file_keeps_the_last_good_state() {
        let mut s = settler();
        let t = Instant::now();
        let broken = ok("items: [ {unclosed\n");
        match s.decide(path(), t, &broken, Some(&broken)) {
            Decision::Keep(why) => assert!(why.contains("YAML syntax error"), "{why}"),
            other => panic!("{other:?}"),
        }
        let gone = Err("cannot read config file: No such file".to_string());
        assert!(matches!(
            s.decide(path(), t, &gone, Some(&gone)),
            Decision::Keep(_)
        ));
    }

    #[test]
    fn an_empty_file_removes_everything_only_after_the_grace() {
        let mut s = settler();
        let t0 = Instant::now();
        let empty = ok("");
        match s.decide(path(), t0, &empty, Some(&empty)) {
            Decision::Wait(d, Some(note)) => {
                assert_eq!(d, EMPTY_GRACE);
                assert!(note.contains("is empty"), "{note}");
            }
            other => panic!("{other:?}"),
        }
        // Still empty 3 s later: wait the rest, no second warning.
        let t3 = t0 + Duration::from_secs(3);
        assert!(matches!(
            s.decide(path(), t3, &empty, Some(&empty)),
            Decision::Wait(d, None) if d == Duration::from_secs(2)
        ));
        let t5 = t0 + EMPTY_GRACE;
        match s.decide(path(), t5, &empty, Some(&empty)) {
            Decision::Apply(o, Some(w)) => {
                assert!(o.services.is_empty());
                assert!(w.contains("removing every service"), "{w}");
            }
            other => panic!("{other:?}"),
        }
        // Once applied, an empty file is nothing new.
        assert!(matches!(
            s.decide(path(), t5, &empty, Some(&empty)),
            Decision::Apply(_, None)
        ));
    }

    #[test]
    fn a_write_during_the_grace_replaces_the_empty_file() {
        let mut s = settler();
        let t0 = Instant::now();
        let empty = ok("# truncated\n");
        assert!(matches!(
            s.decide(path(), t0, &empty, Some(&empty)),
            Decision::Wait(..)
        ));
        assert!(matches!(
            s.decide(path(), t0, &ok(WEB), Some(&ok(WEB))),
            Decision::Apply(_, None)
        ));
        // The grace starts over the next time it is emptied.
        let later = t0 + Duration::from_secs(60);
        assert!(matches!(
            s.decide(path(), later, &empty, Some(&empty)),
            Decision::Wait(d, Some(_)) if d == EMPTY_GRACE
        ));
    }
}
