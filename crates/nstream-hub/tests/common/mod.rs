//! A fake Hugging Face hub cache laid out as the real one, shared by the hub's tests.

use std::path::{Path, PathBuf};

/// Writes `files` (path in the repo, content) into `hub/models--owner--name` at `revision` as
/// the hub clients do: blobs, snapshot symlinks into them, and `refs/main`.
pub fn fake_repo(hub: &Path, repo_id: &str, revision: &str, files: &[(&str, &str)]) -> PathBuf {
    let repo = hub.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(revision);
    std::fs::create_dir_all(repo.join("blobs")).expect("blobs");
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs/main"), revision).expect("ref");
    for (index, (name, content)) in files.iter().enumerate() {
        let blob = format!("blob{index}");
        std::fs::write(repo.join("blobs").join(&blob), content).expect("blob");
        let link = snapshot.join(name);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("snapshot dir");
        let depth = name.matches('/').count() + 2;
        std::os::unix::fs::symlink(format!("{}blobs/{blob}", "../".repeat(depth)), &link).expect("symlink");
    }
    repo
}
