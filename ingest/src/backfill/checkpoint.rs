//! Where an interrupted backfill resumes: a small JSON file per (account, topic) in
//! `--state-dir`, rewritten atomically after every page whose records are all acknowledged.
//!
//! A file rather than a Kafka topic: the checkpoint belongs to one operator's run on one
//! machine, must be readable and deletable by hand, and a lost checkpoint costs only a re-run
//! (the snapshot ids make re-appended objects duplicates the projector skips). A topic would
//! add a second log to keep and a consumer to read it, for no gain in correctness.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Resource;

/// The checkpoint file's format version; another version is refused rather than misread.
const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format: u32,
    pub account: Option<String>,
    pub topic: String,
    /// Resources whose every page is written.
    pub completed: Vec<Resource>,
    /// The resource being paged, and the id of the last object written: the `starting_after`
    /// of the next page.
    pub current: Option<Resource>,
    pub starting_after: Option<String>,
    /// Unix seconds of the last write, for humans.
    pub updated_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read the checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the checkpoint {path} is not one this version understands: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

impl CheckpointError {
    pub fn code(&self) -> &'static str {
        match self {
            CheckpointError::Read { .. } => "checkpoint_unreadable",
            CheckpointError::Write { .. } => "checkpoint_unwritable",
            CheckpointError::Invalid { .. } => "checkpoint_invalid",
        }
    }
}

impl Checkpoint {
    pub fn new(account: Option<&str>, topic: &str) -> Self {
        Checkpoint {
            format: FORMAT,
            account: account.map(str::to_owned),
            topic: topic.to_owned(),
            completed: Vec::new(),
            current: None,
            starting_after: None,
            updated_at: 0,
        }
    }

    /// Where to continue `resource`: `None` to start it from the first page, `Some(cursor)` to
    /// continue after `cursor` (itself `None` when no page of it was written yet).
    pub fn resume_point(&self, resource: Resource) -> Option<Option<String>> {
        if self.completed.contains(&resource) {
            return None;
        }
        if self.current == Some(resource) {
            return Some(self.starting_after.clone());
        }
        Some(None)
    }

    pub fn is_completed(&self, resource: Resource) -> bool {
        self.completed.contains(&resource)
    }

    /// A page of `resource` is written up to `cursor`.
    pub fn advance(&mut self, resource: Resource, cursor: Option<&str>, now: i64) {
        self.current = Some(resource);
        self.starting_after = cursor.map(str::to_owned);
        self.updated_at = now;
    }

    /// Every page of `resource` is written (or it is not offered).
    pub fn complete(&mut self, resource: Resource, now: i64) {
        if !self.completed.contains(&resource) {
            self.completed.push(resource);
        }
        self.current = None;
        self.starting_after = None;
        self.updated_at = now;
    }
}

/// `backfill-<account|platform>-<topic>.json`: one file per target, so backfills of several
/// accounts or into several logs never share a cursor.
pub fn path_for(state_dir: &Path, account: Option<&str>, topic: &str) -> PathBuf {
    state_dir.join(format!(
        "backfill-{}-{}.json",
        account.unwrap_or("platform"),
        topic
    ))
}

/// Reads the checkpoint; `None` when there is none yet.
pub fn load(path: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CheckpointError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let checkpoint: Checkpoint =
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Invalid {
            path: path.to_owned(),
            problem: e.to_string(),
        })?;
    if checkpoint.format != FORMAT {
        return Err(CheckpointError::Invalid {
            path: path.to_owned(),
            problem: format!("format {} (expected {FORMAT})", checkpoint.format),
        });
    }
    Ok(Some(checkpoint))
}

/// Writes the checkpoint to a temporary file, syncs it and renames it over the old one, so a
/// crash leaves the old or the new checkpoint, never half of one.
pub fn store(path: &Path, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
    let write_err = |source| CheckpointError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    let tmp = path.with_extension("json.tmp");
    let bytes =
        serde_json::to_vec_pretty(checkpoint).map_err(|e| write_err(std::io::Error::other(e)))?;
    let mut file = std::fs::File::create(&tmp).map_err(write_err)?;
    file.write_all(&bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_checkpoint_starts_every_resource_at_the_first_page() {
        let c = Checkpoint::new(None, "stripe.events");
        assert_eq!(c.resume_point(Resource::Customers), Some(None));
        assert_eq!(c.resume_point(Resource::Subscriptions), Some(None));
    }

    #[test]
    fn resume_continues_after_the_last_object_written_and_skips_completed_resources() {
        let mut c = Checkpoint::new(Some("acct_1"), "stripe.events");
        c.advance(Resource::Customers, Some("cus_100"), 1);
        c.complete(Resource::Customers, 2);
        c.advance(Resource::Subscriptions, Some("sub_42"), 3);
        assert_eq!(c.resume_point(Resource::Customers), None);
        assert_eq!(
            c.resume_point(Resource::Subscriptions),
            Some(Some("sub_42".to_owned()))
        );
        assert_eq!(c.resume_point(Resource::CheckoutSessions), Some(None));
    }

    #[test]
    fn stored_checkpoints_read_back_and_other_formats_are_refused() {
        let dir = std::env::temp_dir().join(format!("ckpt-test-{}", std::process::id()));
        let path = path_for(&dir, Some("acct_1"), "t.events");
        assert!(path.ends_with("backfill-acct_1-t.events.json"));
        assert_eq!(load(&path).unwrap(), None);
        let mut c = Checkpoint::new(Some("acct_1"), "t.events");
        c.advance(Resource::Entitlements, Some("cus_9"), 7);
        store(&path, &c).unwrap();
        assert_eq!(load(&path).unwrap(), Some(c.clone()));
        c.format = 99;
        store(&path, &c).unwrap();
        let e = load(&path).unwrap_err();
        assert_eq!(e.code(), "checkpoint_invalid");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
