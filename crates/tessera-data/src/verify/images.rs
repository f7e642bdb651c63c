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

/// How deep `verify` looks at each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Depth {
    /// Decode every image and mask fully (truncated and corrupt files are found), and check
    /// mask values.
    #[default]
    Decode,
    /// Read the headers only (sizes): fast, but a file cut short after its header passes.
    Headers,
}

/// What a mask holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MaskValues {
    pub max: u8,
    /// Pixels whose value is neither 0 nor 255.
    pub odd: u64,
}

/// A file's size and, for a mask, its values; or why it cannot be read.
type Inspected = std::result::Result<((u32, u32), Option<MaskValues>), String>;

/// Decode a whole image (bounded memory: `image`'s allocation limit), its size, and for a mask
/// its value statistics.
fn decode_full(path: &Path, mask: bool) -> Inspected {
    let mut reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| e.to_string())?;
    reader.limits(crate::preprocess::decode_limits());
    let img = reader.decode().map_err(|e| e.to_string())?;
    let size = (img.width(), img.height());
    if size.0 == 0 || size.1 == 0 {
        return Err("the image is empty (0 pixels)".into());
    }
    let values = mask.then(|| {
        let g = img.to_luma8();
        let mut max = 0u8;
        let mut odd = 0u64;
        for p in g.pixels() {
            max = max.max(p[0]);
            odd += (p[0] != 0 && p[0] != 255) as u64;
        }
        MaskValues { max, odd }
    });
    Ok((size, values))
}

/// Check `images` in parallel at `depth`; their sizes (`None`: unreadable, with an issue). For
/// masks (`masks`), decoded masks are also checked for 0/255 values and for emptiness.
pub(crate) fn inspect(
    images: &[PathBuf],
    depth: Depth,
    masks: bool,
    issues: &mut Vec<Issue>,
) -> Vec<Option<(u32, u32)>> {
    let r: Vec<Inspected> = images
        .par_iter()
        .map(|p| match depth {
            Depth::Headers => image_size(p).map(|s| (s, None)),
            Depth::Decode => decode_full(p, masks),
        })
        .collect();
    r.into_iter()
        .zip(images)
        .map(|(r, p)| match r {
            Ok((s, v)) => {
                if let Some(v) = v {
                    if v.max == 0 {
                        issues.push(Issue::new(
                            IssueKind::EmptyMask,
                            p,
                            "the mask marks no defect pixel (all zero)",
                        ));
                    } else if v.max <= 127 {
                        issues.push(Issue::new(
                            IssueKind::MaskValues,
                            p,
                            format!(
                                "mask values go up to {} only (a 0/{} mask?): Tessera reads > 0 \
                                 as defect here, but masks should be 0/255",
                                v.max, v.max
                            ),
                        ));
                    } else if v.odd > 0 {
                        issues.push(Issue::new(
                            IssueKind::MaskValues,
                            p,
                            format!(
                                "{} pixels are neither 0 nor 255 (anti-aliased or resized with \
                                 interpolation?); they are read as defect when > 127",
                                v.odd
                            ),
                        ));
                    }
                }
                Some(s)
            }
            Err(e) => {
                issues.push(Issue::new(
                    IssueKind::Unreadable,
                    p,
                    match depth {
                        Depth::Headers => format!("cannot read the image header: {e}"),
                        Depth::Decode => format!("cannot decode the image: {e}"),
                    },
                ));
                None
            }
        })
        .collect()
}
