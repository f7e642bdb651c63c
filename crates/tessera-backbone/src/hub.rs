//! Weights from the Hugging Face hub, through `hf-hub`'s blocking client.
//!
//! The hub cache (`HF_HOME`, default `~/.cache/huggingface`) is consulted first; with
//! `HF_HUB_OFFLINE=1` nothing is downloaded and a missing file is a clear error.

use std::path::PathBuf;
use tessera_core::{Error, Result};

/// A file in a hub repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    /// e.g. `timm/resnet18.tv_in1k`.
    pub repo: String,
    /// e.g. `model.safetensors`.
    pub file: String,
    /// Git revision (`main` by default).
    pub revision: String,
}

impl HubSpec {
    /// `model.safetensors` at `main` of `repo`.
    pub fn new(repo: &str) -> Self {
        Self {
            repo: repo.into(),
            file: "model.safetensors".into(),
            revision: "main".into(),
        }
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// Local path of a hub file: from the cache, else downloaded (unless offline).
pub fn hub_weights(spec: &HubSpec) -> Result<PathBuf> {
    let repo = hf_hub::Repo::with_revision(
        spec.repo.clone(),
        hf_hub::RepoType::Model,
        spec.revision.clone(),
    );
    let cache = hf_hub::Cache::from_env();
    if let Some(p) = cache.repo(repo.clone()).get(&spec.file) {
        return Ok(p);
    }
    let where_ = format!(
        "hub file {}/{} (revision {})",
        spec.repo, spec.file, spec.revision
    );
    if offline() {
        return Err(Error::Unavailable(format!(
            "{where_} is not in the hub cache ({}) and HF_HUB_OFFLINE is set: download it on a \
             connected machine or pass a local file with --weights",
            cache.path().display()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| Error::Unavailable(format!("cannot set up the hub client: {e}")))?;
    api.repo(repo).get(&spec.file).map_err(|e| {
        Error::Unavailable(format!(
            "cannot download {where_}: {e}. Without network, pass a local weights file with \
             --weights FILE (or set HF_HUB_OFFLINE=1 to use the cache only)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_and_not_cached_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("tessera-hub-{}", std::process::id()));
        // SAFETY: this test is the only one in this crate touching these variables.
        unsafe {
            std::env::set_var("HF_HOME", &dir);
            std::env::set_var("HF_HUB_OFFLINE", "1");
        }
        let e = hub_weights(&HubSpec::new("timm/resnet18.tv_in1k"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("timm/resnet18.tv_in1k") && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        assert!(e.contains("--weights"), "{e}");
    }

    #[test]
    fn cached_file_is_found_offline() {
        let dir = std::env::temp_dir().join(format!("tessera-hubc-{}", std::process::id()));
        let cache = hf_hub::Cache::new(dir.join("hub"));
        let repo =
            hf_hub::Repo::with_revision("timm/x".into(), hf_hub::RepoType::Model, "main".into());
        // Lay out a cache entry as huggingface_hub does: refs/main → snapshot folder.
        let folder = dir.join("hub").join(repo.folder_name());
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), "abc").unwrap();
        std::fs::create_dir_all(folder.join("snapshots/abc")).unwrap();
        std::fs::write(folder.join("snapshots/abc/model.safetensors"), "w").unwrap();
        let got = cache.repo(repo).get("model.safetensors").unwrap();
        assert!(got.ends_with("snapshots/abc/model.safetensors"));
    }
}
