//! Placement: which node runs which part, at launch (parts onto nodes) and
//! at restart (the checkpoint's nodes onto target nodes), as per-node
//! orders for the agents.

use std::path::PathBuf;

use serde::Serialize;

use crate::config::{AgentAddr, Cluster, ConfigError};
use crate::jobspec::{JobSpec, Network};
use crate::store::{Checkpoint, CheckpointId, StoreError};

/// Why a job or checkpoint cannot be placed on the nodes asked for.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Placement(String),
}

/// What one node's agent starts at launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaunchOrder {
    pub node: String,
    pub agent: AgentAddr,
    /// Names of the parts it starts, in spec order.
    pub parts: Vec<String>,
}

/// A job spec placed onto nodes.
#[derive(Debug, Clone, Serialize)]
pub struct LaunchPlan {
    /// The spec with every part's node filled in (what checkpoints record).
    pub spec: JobSpec,
    pub orders: Vec<LaunchOrder>,
}

/// Places every part of `spec` on a node: a part that names its node keeps
/// it; the others go, in spec order, to the least loaded of the candidate
/// nodes (`nodes`, as `--nodes` gives them, else every node of the
/// cluster), earlier candidates first on a tie: round-robin.
pub fn place(
    spec: &JobSpec,
    cluster: &Cluster,
    nodes: Option<&[String]>,
) -> Result<LaunchPlan, PlanError> {
    let candidates: Vec<String> = match nodes {
        Some(list) => {
            for n in list {
                cluster.require_node(n)?;
            }
            list.to_vec()
        }
        None => cluster.nodes.iter().map(|n| n.name.clone()).collect(),
    };
    if candidates.is_empty() {
        return Err(PlanError::Placement("no nodes to place the job on".into()));
    }
    let mut load = vec![0usize; candidates.len()];
    let mut placed = spec.clone();
    for p in &placed.parts {
        if let Some(n) = &p.node {
            cluster.require_node(n).map_err(|e| {
                PlanError::Placement(format!(
                    "part '{}' of job '{}' asks for an unknown node: {e}",
                    p.name, spec.job
                ))
            })?;
            match candidates.iter().position(|c| c == n) {
                Some(i) => load[i] += 1,
                None => {
                    return Err(PlanError::Placement(format!(
                        "part '{}' asks for node {n} (in its job spec), which is not among --nodes {}; \
                         add {n} to --nodes or remove the part's node",
                        p.name,
                        candidates.join(",")
                    )))
                }
            }
        }
    }
    for p in placed.parts.iter_mut().filter(|p| p.node.is_none()) {
        let i = (0..candidates.len())
            .min_by_key(|&i| (load[i], i))
            .expect("candidates is not empty");
        load[i] += 1;
        p.node = Some(candidates[i].clone());
    }
    let mut orders: Vec<LaunchOrder> = Vec::new();
    for p in &placed.parts {
        let node = p.node.as_deref().expect("every part is placed");
        match orders.iter_mut().find(|o| o.node == node) {
            Some(o) => o.parts.push(p.name.clone()),
            None => orders.push(LaunchOrder {
                node: node.to_string(),
                agent: cluster.require_node(node)?.agent.clone(),
                parts: vec![p.name.clone()],
            }),
        }
    }
    Ok(LaunchPlan {
        spec: placed,
        orders,
    })
}

/// One part to restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartRestore {
    pub part: String,
    /// The node it was dumped on.
    pub from_node: String,
    /// Its image directory in the store.
    pub images: PathBuf,
    /// The agent job id to restore it under.
    pub agent_job: String,
    /// Its network, which moves with it.
    pub network: Option<Network>,
}

/// What one node's agent restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreOrder {
    pub node: String,
    pub agent: AgentAddr,
    /// The bridge the parts' veths join on this node.
    pub bridge: String,
    pub parts: Vec<PartRestore>,
}

/// A checkpoint placed onto target nodes.
#[derive(Debug, Clone, Serialize)]
pub struct RestartPlan {
    pub job: String,
    pub checkpoint: CheckpointId,
    /// Each node of the checkpoint and the node that takes its parts.
    pub mapping: Vec<(String, String)>,
    pub orders: Vec<RestoreOrder>,
    /// Target nodes given but not needed.
    pub unused: Vec<String>,
    pub tcp_established: bool,
}

/// Maps the nodes of checkpoint `cp` onto `nodes` (`--nodes`; default: the
/// nodes it was taken on), one to one in order: the parts of the
/// checkpoint's first node go to the first target, and so on. With fewer
/// targets than the checkpoint had nodes, `pack` puts several nodes' parts
/// on one target (round-robin); without it that is refused.
pub fn plan_restart(
    cp: &Checkpoint,
    cluster: &Cluster,
    nodes: Option<&[String]>,
    pack: bool,
) -> Result<RestartPlan, PlanError> {
    let spec = cp.spec()?;
    let parts: Vec<(String, String, PathBuf)> = cp
        .manifest
        .parts
        .iter()
        .map(|p| (p.name.clone(), p.node.clone(), cp.part_dir(&p.name)))
        .collect();
    let Moves {
        mapping,
        orders,
        unused,
    } = plan_moves(
        &format!("checkpoint {}", cp.label()),
        &spec,
        &parts,
        cluster,
        nodes,
        pack,
    )?;
    Ok(RestartPlan {
        job: cp.job.clone(),
        checkpoint: cp.id.clone(),
        mapping,
        orders,
        unused,
        tcp_established: cp.options().tcp_established,
    })
}

/// Parts mapped onto target nodes.
#[derive(Debug, Clone)]
pub struct Moves {
    /// Each old node and the node that takes its parts.
    pub mapping: Vec<(String, String)>,
    /// What each target node's agent restores.
    pub orders: Vec<RestoreOrder>,
    /// Target nodes given but not needed.
    pub unused: Vec<String>,
}

/// Where parts go: [`plan_restart`]'s mapping of old nodes onto `nodes`,
/// for `parts` (name, node it is on or was dumped on, images) of job
/// `spec`, named `what` in errors.
pub fn plan_moves(
    what: &str,
    spec: &JobSpec,
    parts: &[(String, String, PathBuf)],
    cluster: &Cluster,
    nodes: Option<&[String]>,
    pack: bool,
) -> Result<Moves, PlanError> {
    let mut old: Vec<&str> = Vec::new();
    for (_, node, _) in parts {
        if !old.contains(&node.as_str()) {
            old.push(node);
        }
    }
    let (mapping, unused): (Vec<(String, String)>, Vec<String>) = match nodes {
        None => {
            for n in &old {
                if cluster.node(n).is_none() {
                    return Err(PlanError::Placement(format!(
                        "{what} was taken on node {n}, which is not in the cluster configuration {}; \
                         restart it elsewhere with --nodes (it needs {} node{})",
                        cluster.describe_source(),
                        old.len(),
                        if old.len() == 1 { "" } else { "s" }
                    )));
                }
            }
            (
                old.iter().map(|n| (n.to_string(), n.to_string())).collect(),
                Vec::new(),
            )
        }
        Some(list) => {
            for n in list {
                cluster.require_node(n)?;
            }
            if list.is_empty() || (list.len() < old.len() && !pack) {
                return Err(PlanError::Placement(format!(
                    "{what} has parts on {} nodes ({}), but {} node{} given ({}); \
                     name {} nodes, or add --pack to put several nodes' parts on one",
                    old.len(),
                    old.join(", "),
                    list.len(),
                    if list.len() == 1 { " is" } else { "s are" },
                    list.join(", "),
                    old.len()
                )));
            }
            let mapping = old
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), list[i % list.len()].clone()))
                .collect();
            (mapping, list.iter().skip(old.len()).cloned().collect())
        }
    };
    let mut orders: Vec<RestoreOrder> = Vec::new();
    for (name, node, images) in parts {
        let target = &mapping
            .iter()
            .find(|(o, _)| o == node)
            .expect("every old node is mapped")
            .1;
        let restore = PartRestore {
            part: name.clone(),
            from_node: node.clone(),
            images: images.clone(),
            agent_job: spec.agent_job_id(name),
            network: spec.part(name).and_then(|s| s.network.clone()),
        };
        match orders.iter_mut().find(|o| &o.node == target) {
            Some(o) => o.parts.push(restore),
            None => {
                let node = cluster.require_node(target)?;
                orders.push(RestoreOrder {
                    node: node.name.clone(),
                    agent: node.agent.clone(),
                    bridge: node.bridge.clone(),
                    parts: vec![restore],
                })
            }
        }
    }
    Ok(Moves {
        mapping,
        orders,
        unused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterKey;
    use crate::store::{DumpedPart, Store, INVENTORY};
    use ckpt_proto::image::{CheckpointOptions, Inventory};
    use ckpt_proto::{write_image_file, ImageKind};
    use std::path::Path;

    fn cluster(n: usize) -> Cluster {
        let mut text = String::from("key = \"k\"\n");
        for i in 1..=n {
            text += &format!("[[node]]\nname = \"n{i}\"\nagent = \"198.18.1.{i}:7707\"\n");
        }
        let t = tempfile::tempdir().unwrap();
        let k = t.path().join("k");
        std::fs::write(&k, [1u8; 32]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        Cluster::parse(&text, &t.path().join("cluster.toml")).unwrap()
    }

    fn spec(parts: &[(&str, Option<&str>)]) -> JobSpec {
        let mut text = String::from("job = \"j\"\n");
        for (name, node) in parts {
            text += &format!("[[part]]\nname = \"{name}\"\ncommand = \"x\"\n");
            if let Some(n) = node {
                text += &format!("node = \"{n}\"\n");
            }
        }
        JobSpec::parse(&text, Path::new("j.toml"), None).unwrap()
    }

    fn nodes_of(p: &LaunchPlan) -> Vec<String> {
        p.spec
            .parts
            .iter()
            .map(|p| p.node.clone().unwrap())
            .collect()
    }

    fn list(s: &str) -> Vec<String> {
        crate::parse_node_list(s).unwrap()
    }

    #[test]
    fn launch_round_robin() {
        let c = cluster(3);
        let p = place(
            &spec(&[("a", None), ("b", None), ("c", None), ("d", None)]),
            &c,
            None,
        )
        .unwrap();
        assert_eq!(nodes_of(&p), ["n1", "n2", "n3", "n1"]);
        assert_eq!(p.orders.len(), 3);
        assert_eq!(p.orders[0].parts, ["a", "d"]);
        assert_eq!(p.orders[0].agent.to_string(), "198.18.1.1:7707");
        let p = place(&spec(&[("a", None), ("b", None)]), &c, Some(&list("n3,n2"))).unwrap();
        assert_eq!(nodes_of(&p), ["n3", "n2"]);
    }

    #[test]
    fn launch_keeps_asked_nodes_and_balances_the_rest() {
        let c = cluster(3);
        let p = place(
            &spec(&[("a", Some("n1")), ("b", None), ("c", None)]),
            &c,
            Some(&list("n1,n2")),
        )
        .unwrap();
        assert_eq!(nodes_of(&p), ["n1", "n2", "n1"]);
        let p = place(&spec(&[("a", None), ("b", Some("n1"))]), &c, None).unwrap();
        assert_eq!(nodes_of(&p), ["n2", "n1"]);
    }

    #[test]
    fn launch_refusals() {
        let c = cluster(2);
        let e = place(&spec(&[("a", Some("n9"))]), &c, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("part 'a'") && e.contains("n9") && e.contains("known nodes: n1, n2"),
            "{e}"
        );
        let e = place(&spec(&[("a", None)]), &c, Some(&list("n1,n7")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node n7: not in the cluster configuration"),
            "{e}"
        );
        let e = place(&spec(&[("a", Some("n2"))]), &c, Some(&list("n1")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("asks for node n2") && e.contains("not among --nodes n1"),
            "{e}"
        );
    }

    /// A committed checkpoint of parts on the given nodes.
    fn checkpoint(dir: &Path, parts: &[(&str, &str)]) -> Checkpoint {
        let s = spec(
            &parts
                .iter()
                .map(|(p, n)| (*p, Some(*n)))
                .collect::<Vec<_>>(),
        );
        let store = Store::new(dir);
        let pending = store.begin("j").unwrap();
        let mut dumped = Vec::new();
        for (p, n) in parts {
            let d = pending.part_dir(p).unwrap();
            write_image_file(
                &d.join(INVENTORY),
                ImageKind::Inventory,
                &Inventory::default(),
            )
            .unwrap();
            dumped.push(DumpedPart {
                name: p.to_string(),
                node: n.to_string(),
            });
        }
        let key = ClusterKey::from_bytes(Path::new("k"), vec![1; 32]);
        let opts = CheckpointOptions {
            leave_running: false,
            tcp_established: true,
        };
        pending.commit(&s, &dumped, opts, Some(&key)).unwrap()
    }

    fn targets(p: &RestartPlan) -> Vec<(String, Vec<String>)> {
        p.orders
            .iter()
            .map(|o| {
                (
                    o.node.clone(),
                    o.parts.iter().map(|r| r.part.clone()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn restart_on_the_original_nodes() {
        let t = tempfile::tempdir().unwrap();
        let cp = checkpoint(t.path(), &[("a", "n1"), ("b", "n2"), ("c", "n1")]);
        let p = plan_restart(&cp, &cluster(3), None, false).unwrap();
        assert_eq!(
            targets(&p),
            [
                ("n1".into(), vec!["a".into(), "c".into()]),
                ("n2".into(), vec!["b".into()])
            ]
        );
        assert!(p.tcp_established);
        assert_eq!(p.orders[0].parts[0].images, cp.part_dir("a"));
        assert_eq!(p.orders[0].parts[0].agent_job, "j.a");
        assert_eq!(p.orders[0].bridge, "br0");
        let e = plan_restart(&cp, &cluster(1), None, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("taken on node n2, which is not in the cluster") && e.contains("--nodes"),
            "{e}"
        );
    }

    #[test]
    fn restart_on_other_nodes_in_order() {
        let t = tempfile::tempdir().unwrap();
        let cp = checkpoint(t.path(), &[("a", "n1"), ("b", "n2")]);
        let c = cluster(4);
        let p = plan_restart(&cp, &c, Some(&list("n4,n3")), false).unwrap();
        assert_eq!(
            p.mapping,
            [("n1".into(), "n4".into()), ("n2".into(), "n3".into())]
        );
        assert_eq!(
            targets(&p),
            [
                ("n4".into(), vec!["a".into()]),
                ("n3".into(), vec!["b".into()])
            ]
        );
        assert_eq!(p.orders[1].parts[0].from_node, "n2");
        let p = plan_restart(&cp, &c, Some(&list("n3,n4,n1")), false).unwrap();
        assert_eq!(p.unused, ["n1"]);
    }

    #[test]
    fn restart_on_too_few_or_unknown_nodes() {
        let t = tempfile::tempdir().unwrap();
        let cp = checkpoint(t.path(), &[("a", "n1"), ("b", "n2")]);
        let c = cluster(4);
        let e = plan_restart(&cp, &c, Some(&list("n3")), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("parts on 2 nodes (n1, n2), but 1 node is given (n3)")
                && e.contains("--pack"),
            "{e}"
        );
        let p = plan_restart(&cp, &c, Some(&list("n3")), true).unwrap();
        assert_eq!(targets(&p), [("n3".into(), vec!["a".into(), "b".into()])]);
        let e = plan_restart(&cp, &c, Some(&list("n3,n9")), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node n9: not in the cluster configuration"),
            "{e}"
        );
    }
}
