//! Image checks: sizes from the headers, in parallel.

use super::report::{Issue, IssueKind};
use rayon::prelude::*;
use std::io::Read;
use std::path::{Path, PathBuf};

pub fn image_size(path: &Path) -> std::result::Result<(u32, u32), String> {
    let mut head = [0u8; 24];
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let n = read_up_to(&mut f, &mut head).map_err(|e| e.to_string())?;
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    if n >= 8 && &head[..8] == PNG {
        if n < 24 || &head[12..16] != b"IHDR" {
            return Err("truncated or malformed PNG header".into());
        }
        let w = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(head[20..24].try_into().unwrap());
        if w == 0 || h == 0 {
            return Err(format!("PNG header gives an empty image ({w}×{h})"));
        }
        return Ok((w, h));
    }
    image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Check the headers of `images` in parallel; their sizes (`None`: unreadable, with an issue).
pub(crate) fn sizes(images: &[PathBuf], issues: &mut Vec<Issue>) -> Vec<Option<(u32, u32)>> {
    let r: Vec<std::result::Result<(u32, u32), String>> =
        images.par_iter().map(|p| image_size(p)).collect();
    r.into_iter()
        .zip(images)
        .map(|(r, p)| match r {
            Ok(s) => Some(s),
            Err(e) => {
                issues.push(Issue::new(
                    IssueKind::Unreadable,
                    p,
                    format!("cannot read the image header: {e}"),
                ));
                None
            }
        })
        .collect()
}
