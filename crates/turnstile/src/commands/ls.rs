//! `turnstile ls`: the nodes the user's roles let them reach, as the proxy
//! knows them.

use serde_json::json;
use turnstile_api::labels::DisplayLabels;
use turnstile_ssh::client::door::list_nodes;

use crate::cli::{Format, LsArgs};
use crate::profile::client_identity;

pub async fn run(args: LsArgs) -> anyhow::Result<()> {
    let (identity, proxy) = client_identity(&args.client)?;
    let nodes = list_nodes(&proxy, &identity.trust, &identity.credentials).await?;
    if args.format == Format::Json {
        for n in &nodes {
            crate::outln!(
                "{}",
                json!({"name": n.name, "addr": n.addr, "labels": n.labels, "id": n.id})
            );
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.addr.clone(),
                DisplayLabels(&n.labels).to_string(),
            ]
        })
        .collect();
    crate::commands::admin::print_table(&["NODE", "ADDRESS", "LABELS"], &rows);
    Ok(())
}
