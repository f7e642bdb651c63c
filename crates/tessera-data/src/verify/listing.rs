//! Folder listings for the checks: every entry accounted for (images, other files, folders),
//! with missing or unreadable folders reported as problems instead of errors. The listing
//! itself is the crate's one walker, [`crate::read_folder`].

use super::report::{Issue, IssueKind};
use crate::layout::{read_folder, FolderEntries};
use std::path::Path;

/// List a folder; `None` (and an issue) when it is missing or unreadable. `expected`: the
/// images it should hold, for the message.
pub(crate) fn list_expecting(
    dir: &Path,
    expected: Option<u64>,
    issues: &mut Vec<Issue>,
) -> Option<FolderEntries> {
    if !dir.is_dir() {
        issues.push(Issue::new(
            IssueKind::MissingFolder,
            dir,
            match expected {
                Some(e) => format!("folder does not exist (expected {e} images)"),
                None => "folder does not exist".into(),
            },
        ));
        return None;
    }
    match read_folder(dir) {
        Ok(l) => Some(l),
        Err(e) => {
            issues.push(Issue::new(
                IssueKind::Unreadable,
                dir,
                format!(
                    "cannot list folder: {}",
                    tessera_core::error::describe_io(&e)
                ),
            ));
            None
        }
    }
}

pub(crate) fn list(dir: &Path, issues: &mut Vec<Issue>) -> Option<FolderEntries> {
    list_expecting(dir, None, issues)
}

/// Names of the non-hidden sub-folders of `dir`, sorted.
pub(crate) fn subdirs(dir: &Path, issues: &mut Vec<Issue>) -> Vec<String> {
    list(dir, issues)
        .map(|l| {
            l.dirs
                .iter()
                .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
