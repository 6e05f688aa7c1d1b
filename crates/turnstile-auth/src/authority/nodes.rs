//! Node presence (`nodes/<host id>`): registrations that expire without a heartbeat.

use super::*;
use crate::backend::typed::{self, Change, Stored};

impl Authority {
    /// Registers or refreshes a node; it disappears after `ttl` without another call.
    /// Node names are unique ignoring case, as OpenSSH lower-cases host names.
    pub async fn upsert_node(&self, node: NodeRecord, ttl: Duration) -> Result<(), ApiError> {
        validate_name("node name", &node.name).map_err(ApiError::bad_parameter)?;
        if node.addr.ends_with(":0") || node.addr.is_empty() {
            return Err(ApiError::bad_parameter(format!(
                "node {:?} advertises address {:?}; a node must advertise the real address it listens on",
                node.name, node.addr
            )));
        }
        for other in self.list_nodes().await? {
            if other.name.eq_ignore_ascii_case(&node.name) && other.id != node.id {
                return Err(ApiError::already_exists(format!(
                    "node name {:?} is already used by node {} as {:?} (names match ignoring case); give this node another ssh_service.node_name",
                    node.name, other.id, other.name
                )));
            }
        }
        let expires = self.clock.now() + ttl.clamp(Duration::from_secs(1), MAX_NODE_TTL);
        // The name is claimed by compare-and-swap, so two nodes registering
        // one name at once through two auth servers cannot both have it.
        let claim = format!("node_names/{}", node.name.to_ascii_lowercase());
        typed::update(
            self.backend.as_ref(),
            &claim,
            |current: Option<&Stored<String>>| match current {
                Some(held) if held.value != node.id => Err(ApiError::already_exists(format!(
                    "node name {:?} is already used by node {} (names match ignoring case); give this node another ssh_service.node_name",
                    node.name, held.value
                ))),
                _ => Ok((Change::Put(node.id.clone(), Some(expires)), ())),
            },
        )
        .await?;
        let record = NodeRecord {
            expires_unix: unix_secs(expires),
            ..node
        };
        self.backend
            .put(
                &format!("nodes/{}", record.id),
                encode(&record),
                Some(expires),
            )
            .await?;
        Ok(())
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, ApiError> {
        let mut nodes: Vec<NodeRecord> = self
            .backend
            .range("nodes/")
            .await?
            .iter()
            .map(|item| decode(&item.key, &item.value))
            .collect::<Result<_, _>>()?;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }

    /// Labels by node, for access checks in listings.
    pub async fn node_labels(&self) -> Result<BTreeMap<String, Labels>, ApiError> {
        Ok(self
            .list_nodes()
            .await?
            .into_iter()
            .map(|n| (n.name, n.labels))
            .collect())
    }
}
