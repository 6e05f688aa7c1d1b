//! Configuration: `file` holds the YAML shapes, `resolve` turns them into
//! typed settings per service.

pub mod file;
pub mod resolve;

use std::path::{Path, PathBuf};

use anyhow::Context;

pub use resolve::ResolvedConfig;

/// Reads `--config FILE` (if any) and resolves it with `--data-dir`.
pub fn load(config: Option<&Path>, data_dir: Option<PathBuf>) -> anyhow::Result<ResolvedConfig> {
    let (file, from_file) = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let parsed = file::parse(&text)
                .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
            (parsed, true)
        }
        None => (file::FileConfig::default(), false),
    };
    resolve::resolve(file, data_dir, from_file).map_err(|e| match config {
        Some(path) => anyhow::anyhow!("config file {}: {e}", path.display()),
        None => anyhow::anyhow!("{e}"),
    })
}
