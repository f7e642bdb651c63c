//! The human rendering of `tessera data verify`'s report.

use std::fmt::Write as _;
use std::path::Path;
use tessera_data::verify::{CategoryReport, CategoryStatus, IssueKind, VerifyReport};

/// `found/expected`, `found/?` or `-` (no folder).
fn frac(found: Option<u64>, expected: Option<u64>) -> String {
    match (found, expected) {
        (None, Some(e)) => format!("-/{e}"),
        (None, None) => "-".into(),
        (Some(f), Some(e)) => format!("{f}/{e}"),
        (Some(f), None) => format!("{f}/?"),
    }
}

fn row(c: &CategoryReport) -> [String; 7] {
    let status = match c.status {
        CategoryStatus::Ok if c.counts_checked => "ok".to_string(),
        CategoryStatus::Ok => "ok (layout)".to_string(),
        CategoryStatus::Failed => format!("FAILED ({})", c.issues.len()),
        CategoryStatus::Missing => "MISSING".to_string(),
    };
    let kind = c
        .kind
        .map(|k| format!("{k:?}").to_lowercase())
        .unwrap_or_else(|| "?".into());
    if c.status == CategoryStatus::Missing {
        return [
            c.name.clone(),
            kind,
            status,
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ];
    }
    let split = |s: &str| {
        c.split(s)
            .map_or_else(|| "-".into(), |s| frac(s.found, s.expected))
    };
    let defective = c.defective_found();
    [
        c.name.clone(),
        kind,
        status,
        split("train/good"),
        split("test/good"),
        frac(Some(defective), c.defective_expected()),
        format!("{}/{defective}", c.masks_found()),
    ]
}

/// A path relative to the checked root when it lies inside it.
fn rel<'a>(p: &'a Path, root: &Path) -> std::borrow::Cow<'a, str> {
    match p.strip_prefix(root) {
        Ok(r) if !r.as_os_str().is_empty() => r.to_string_lossy(),
        _ => p.to_string_lossy(),
    }
}

/// Problems listed per category in the table before "… and N more".
const MAX_LISTED: usize = 20;

/// The human rendering of a report: a table of categories (found/expected per split, masks
/// found / defective images), then the problems, each naming its file or folder, and a verdict.
pub fn verify_table(r: &VerifyReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} checked against the {} manifest{}\n",
        r.root.display(),
        r.manifest,
        if r.single_category {
            " (one category folder)"
        } else {
            ""
        }
    );
    let header = [
        "category",
        "kind",
        "status",
        "train/good",
        "test/good",
        "defective",
        "masks",
    ]
    .map(String::from);
    let rows: Vec<[String; 7]> = r.categories.iter().map(row).collect();
    let mut width = header.clone().map(|h| h.chars().count());
    for rw in &rows {
        for (w, cell) in width.iter_mut().zip(rw) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for rw in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in rw.iter().zip(width).enumerate() {
            let pad = w - cell.chars().count();
            if i < 3 {
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(line, "{}{cell}  ", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }

    let listed: Vec<(&str, Vec<_>)> = std::iter::once(("dataset root", r.issues.iter().collect()))
        .chain(
            r.categories
                .iter()
                .filter(|c| c.status == CategoryStatus::Failed)
                .map(|c| {
                    (
                        c.name.as_str(),
                        c.issues
                            .iter()
                            .filter(|i| i.kind != IssueKind::MissingCategory)
                            .collect(),
                    )
                }),
        )
        .filter(|(_, v): &(&str, Vec<_>)| !v.is_empty())
        .collect();
    if !listed.is_empty() {
        let _ = writeln!(out, "\nProblems (paths relative to {}):", r.root.display());
        for (name, issues) in listed {
            let _ = writeln!(out, "  {name}:");
            for i in issues.iter().take(MAX_LISTED) {
                let _ = writeln!(
                    out,
                    "    {:<22} {}: {}",
                    i.kind.label(),
                    rel(&i.path, &r.root),
                    i.message
                );
            }
            if issues.len() > MAX_LISTED {
                let _ = writeln!(
                    out,
                    "    … and {} more (--json lists them all)",
                    issues.len() - MAX_LISTED
                );
            }
        }
    }
    let (ok, failed, missing) = (
        r.count(CategoryStatus::Ok),
        r.count(CategoryStatus::Failed),
        r.count(CategoryStatus::Missing),
    );
    let _ = writeln!(
        out,
        "\n{ok} ok, {failed} failed, {missing} missing of {} categor{}{}: {}",
        r.categories.len(),
        if r.categories.len() == 1 { "y" } else { "ies" },
        if r.issues.is_empty() {
            String::new()
        } else {
            format!(", {} problem(s) in the dataset root", r.issues.len())
        },
        if r.ok { "OK" } else { "FAILED" }
    );
    if missing > 0 && !r.single_category {
        let _ = writeln!(
            out,
            "(check only the categories you have with --categories a,b,…)"
        );
    }
    out
}
