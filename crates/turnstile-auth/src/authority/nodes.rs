//! Node names and presence. A node's name is bound to its host id at first
//! join (`node_bindings/<lower-case name>`, kept for good) and never given to
//! another id: only `turnstile admin nodes rename` moves it and `nodes rm`
//! frees it. Registrations (`nodes/<host id>`) expire without a heartbeat.

use super::*;
use crate::backend::typed::{self, Change, Stored};

const BINDINGS: &str = "node_bindings/";

/// A node name and the host id it belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeBinding {
    pub name: String,
    pub host_id: String,
}

fn binding_key(name: &str) -> String {
    format!("{BINDINGS}{}", name.to_ascii_lowercase())
}

/// Where the host key auth last certified for a host id is kept.
fn key_key(host_id: &str) -> String {
    format!("node_keys/{host_id}")
}

impl Authority {
    /// Every name binding.
    pub async fn node_bindings(&self) -> Result<Vec<NodeBinding>, ApiError> {
        self.backend
            .range(BINDINGS)
            .await?
            .iter()
            .map(|item| decode(&item.key, &item.value))
            .collect()
    }

    /// The name bound to `host_id`: the one bound already, else `requested`,
    /// bound now by compare-and-swap (so two nodes asking for one name
    /// through two auth servers cannot both have it). Names are unique
    /// ignoring case, as OpenSSH lower-cases host names, and may not be
    /// another node's host id.
    pub async fn bind_node_name(&self, host_id: &str, requested: &str) -> Result<String, ApiError> {
        if let Some(bound) =
            typed::get::<NodeBinding>(self.backend.as_ref(), &binding_key(requested))
                .await?
                .filter(|b| b.value.host_id == host_id)
        {
            return Ok(bound.value.name);
        }
        let bindings = self.node_bindings().await?;
        if let Some(bound) = bindings.iter().find(|b| b.host_id == host_id) {
            return Ok(bound.name.clone());
        }
        validate_name("node name", requested).map_err(ApiError::bad_parameter)?;
        if let Some(other) = bindings
            .iter()
            .find(|b| b.host_id.eq_ignore_ascii_case(requested))
        {
            return Err(ApiError::already_exists(format!(
                "node name {requested:?} is the host id of node {:?}; give this node another ssh_service.node_name",
                other.name
            )));
        }
        let binding = NodeBinding {
            name: requested.to_string(),
            host_id: host_id.to_string(),
        };
        typed::update(
            self.backend.as_ref(),
            &binding_key(requested),
            |current: Option<&Stored<NodeBinding>>| match current {
                Some(held) if held.value.host_id != host_id => Err(taken(requested, &held.value)),
                Some(held) => Ok((Change::Keep, held.value.name.clone())),
                None => Ok((Change::Put(binding.clone(), None), binding.name.clone())),
            },
        )
        .await
    }

    /// Remembers `key` as the host key of `host_id`: the key auth certified.
    pub(super) async fn remember_node_key(
        &self,
        host_id: &str,
        key: &PublicKey,
    ) -> Result<(), ApiError> {
        let text = key
            .to_openssh()
            .map_err(|e| ApiError::internal(format!("host key: {e}")))?;
        self.backend
            .put(&key_key(host_id), typed::encode(&text), None)
            .await?;
        Ok(())
    }

    /// Moves the name `old` (and the node holding it) to `new`; returns the
    /// binding as it is now. The node's next host certificate carries the new
    /// name.
    pub async fn rename_node(&self, old: &str, new: &str) -> Result<NodeBinding, ApiError> {
        validate_name("new node name", new).map_err(ApiError::bad_parameter)?;
        let held = typed::get::<NodeBinding>(self.backend.as_ref(), &binding_key(old))
            .await?
            .ok_or_else(|| not_bound(old))?
            .value;
        let renamed = NodeBinding {
            name: new.to_string(),
            host_id: held.host_id.clone(),
        };
        typed::update(
            self.backend.as_ref(),
            &binding_key(new),
            |current: Option<&Stored<NodeBinding>>| match current {
                Some(other) if other.value.host_id != held.host_id => Err(taken(new, &other.value)),
                _ => Ok((Change::Put(renamed.clone(), None), ())),
            },
        )
        .await?;
        if !old.eq_ignore_ascii_case(new) {
            self.backend.delete(&binding_key(old)).await?;
        }
        let key = format!("nodes/{}", held.host_id);
        typed::update(
            self.backend.as_ref(),
            &key,
            |current: Option<&Stored<NodeRecord>>| {
                Ok::<_, ApiError>(match current {
                    Some(record) => (
                        Change::Put(
                            NodeRecord {
                                name: new.to_string(),
                                ..record.value.clone()
                            },
                            record.expires,
                        ),
                        (),
                    ),
                    None => (Change::Keep, ()),
                })
            },
        )
        .await?;
        Ok(renamed)
    }

    /// Frees the name `name` and forgets the node holding it (for a node
    /// that is gone: a running one binds its name again at its next
    /// heartbeat if nobody took it meanwhile).
    pub async fn remove_node(&self, name: &str) -> Result<NodeBinding, ApiError> {
        let held = typed::get::<NodeBinding>(self.backend.as_ref(), &binding_key(name))
            .await?
            .ok_or_else(|| not_bound(name))?
            .value;
        self.backend.delete(&binding_key(name)).await?;
        for key in [format!("nodes/{}", held.host_id), key_key(&held.host_id)] {
            match self.backend.delete(&key).await {
                Ok(()) | Err(BackendError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(held)
    }

    /// Registers or refreshes a node under the name bound to its host id
    /// (binding `node.name` if none is); it disappears after `ttl` without
    /// another call.
    pub async fn upsert_node(&self, node: NodeRecord, ttl: Duration) -> Result<(), ApiError> {
        if node.addr.ends_with(":0") || node.addr.is_empty() {
            return Err(ApiError::bad_parameter(format!(
                "node {:?} advertises address {:?}; a node must advertise the real address it listens on",
                node.name, node.addr
            )));
        }
        let name = self.bind_node_name(&node.id, &node.name).await?;
        let host_key = typed::get::<String>(self.backend.as_ref(), &key_key(&node.id))
            .await?
            .map(|k| k.value)
            .unwrap_or_default();
        let expires = self.clock.now() + ttl.clamp(Duration::from_secs(1), MAX_NODE_TTL);
        let record = NodeRecord {
            name,
            expires_unix: unix_secs(expires),
            host_key,
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

fn taken(name: &str, held: &NodeBinding) -> ApiError {
    ApiError::already_exists(format!(
        "node name {name:?} is bound to host {} as {:?} since its first join (names match ignoring case); give this node another ssh_service.node_name, or free the name with `turnstile admin nodes rm {}` if that node is gone",
        held.host_id, held.name, held.name
    ))
}

fn not_bound(name: &str) -> ApiError {
    ApiError::not_found(format!(
        "no node is named {name:?}; `turnstile admin nodes ls` lists them"
    ))
}
