//! Volume transfers (clones and moves) as the scheduler drives them: a pod with a
//! `volume_transfers` row gets its volume from another node before it first starts.
//!
//! *Design.* Each time the pod is converged towards `running` the scheduler mints a fresh
//! one-time token and sends two jobs: the source node an `ExportVolume` (a grant for that token;
//! for a move also "stop the pod for good"), then the destination node the pod spec with
//! `volume_source {addr, pod_id, token}`. The destination pulls, verifies and starts; its
//! `running` report settles the pod, and the reconciler then ends the transfer
//! ([`complete`]): the row goes, and for a move the old node is told to delete its copy —
//! only now, so a failure anywhere before leaves the old volume where it was.
//! Tokens live only in the two jobs and, hashed, in the source agent's memory.

use deadpool_postgres::GenericClient;
use instapod_common::node::{NodeJob, PodSpec, VolumeSource};
use uuid::Uuid;

use super::Context;
use super::converge::{ConvergeError, send};

/// How long a source node accepts a token (a pull must start within it).
pub const TOKEN_TTL_SECS: u64 = 600;

/// A pending transfer into a pod's volume.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// `clone` or `move`.
    pub is_move: bool,
    pub source_pod_id: Uuid,
    pub source_node_id: Uuid,
    pub source_node_name: String,
    /// The source node's peer endpoint, if it advertised one.
    pub peer_addr: Option<String>,
    /// The source pod's generation; `None` when it is gone (deleted before the copy).
    pub source_generation: Option<i64>,
}

/// The pod's pending transfer, if any.
pub async fn load(client: &impl GenericClient, pod_id: Uuid) -> Result<Option<Transfer>, ConvergeError> {
    let row = client
        .query_opt(
            "SELECT t.kind = 'move', t.source_pod_id, t.source_node_id, n.name, n.peer_addr, sp.generation
             FROM volume_transfers t JOIN nodes n ON n.id = t.source_node_id
                  LEFT JOIN pods sp ON sp.id = t.source_pod_id AND sp.desired_state <> 'deleted'
             WHERE t.pod_id = $1",
            &[&pod_id],
        )
        .await?;
    Ok(row.map(|r| Transfer {
        is_move: r.get(0),
        source_pod_id: r.get(1),
        source_node_id: r.get(2),
        source_node_name: r.get(3),
        peer_addr: r.get(4),
        source_generation: r.get(5),
    }))
}

impl Transfer {
    /// Why the transfer cannot happen at all, if it cannot.
    pub fn impossible(&self) -> Option<String> {
        if self.source_generation.is_none() {
            return Some("the source pod was deleted before its volume was copied".to_string());
        }
        if self.peer_addr.is_none() {
            return Some(format!(
                "node {} advertises no peer address, so its volume cannot be copied",
                self.source_node_name
            ));
        }
        None
    }
}

/// A random transfer token: `ipx_` and 64 hex digits (two v4 UUIDs: 244 random bits).
pub fn mint_token() -> String {
    format!("ipx_{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

/// Grants a fresh token on the source node and puts it in `spec` for the destination.
pub async fn prepare(
    ctx: &Context,
    transfer: &Transfer,
    pod_id: Uuid,
    spec: &mut PodSpec,
) -> Result<(), ConvergeError> {
    let (Some(addr), Some(source_generation)) = (transfer.peer_addr.clone(), transfer.source_generation) else {
        return Ok(());
    };
    let token = mint_token();
    send(
        ctx,
        transfer.source_node_id,
        NodeJob::ExportVolume {
            pod_id: transfer.source_pod_id,
            // A move stops the pod at the generation that moved it.
            generation: if transfer.is_move {
                spec.generation
            } else {
                source_generation
            },
            token: token.clone(),
            expires_in_secs: TOKEN_TTL_SECS,
            stop_first: transfer.is_move,
        },
    )
    .await?;
    tracing::debug!(pod = %pod_id, source_node = %transfer.source_node_name, "volume transfer granted");
    spec.volume_source = Some(VolumeSource {
        addr,
        pod_id: transfer.source_pod_id,
        token,
    });
    Ok(())
}

/// Ends the transfers of pods that run on their node now: a moved pod's old copy is deleted on
/// its former node (the job is sent before the row goes, so a lost job is sent again), then
/// the row is removed. Returns how many ended.
pub async fn complete(ctx: &Context) -> anyhow::Result<usize> {
    let client = ctx.db.get().await?;
    let rows = client
        .query(
            "SELECT t.pod_id, t.kind = 'move', t.source_node_id, p.generation, n.name
             FROM volume_transfers t JOIN pods p ON p.id = t.pod_id JOIN nodes n ON n.id = t.source_node_id
             WHERE p.state = 'running' AND p.node_id IS NOT NULL
             LIMIT 1000",
            &[],
        )
        .await?;
    for row in &rows {
        let (pod_id, is_move, source_node, generation, source_name): (Uuid, bool, Uuid, i64, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        if is_move {
            send(
                ctx,
                source_node,
                NodeJob::Delete {
                    pod_id,
                    generation,
                    retain_volume: false,
                },
            )
            .await?;
        }
        let ended = client
            .execute(
                "DELETE FROM volume_transfers WHERE pod_id = $1 AND source_node_id = $2",
                &[&pod_id, &source_node],
            )
            .await?;
        if ended > 0 && is_move {
            client
                .execute(
                    "INSERT INTO pod_events (pod_id, kind, state, message)
                     VALUES ($1, 'state', 'running', $2)",
                    &[
                        &pod_id,
                        &format!("moved: the old copy on node {source_name} is being removed"),
                    ],
                )
                .await?;
        }
    }
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_prefixed() {
        let (a, b) = (mint_token(), mint_token());
        assert!(a.starts_with("ipx_") && a.len() == 68, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn a_transfer_needs_its_source_pod_and_a_peer_address() {
        let transfer = Transfer {
            is_move: false,
            source_pod_id: Uuid::nil(),
            source_node_id: Uuid::nil(),
            source_node_name: "node-a".into(),
            peer_addr: Some("10.0.0.1:9102".into()),
            source_generation: Some(3),
        };
        assert_eq!(transfer.impossible(), None);
        let gone = Transfer {
            source_generation: None,
            ..transfer.clone()
        };
        assert!(gone.impossible().is_some_and(|why| why.contains("deleted")));
        let unreachable = Transfer {
            peer_addr: None,
            ..transfer
        };
        assert!(unreachable.impossible().is_some_and(|why| why.contains("node-a")));
    }
}
