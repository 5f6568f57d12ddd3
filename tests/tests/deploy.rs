//! deploy/: the manifests parse into their Kubernetes types with no
//! unknown field, and say what a kube-proxy replacement needs (the RBAC
//! rules are checked against the agent's real requests in
//! tests/tests/kubernetes.rs).

use std::process::Command;

use lb_tests::{agent::lb_bin, deploy};

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let m = deploy::load().unwrap();
    assert_eq!(m.service_accounts.len(), 1);
    assert_eq!(m.cluster_roles.len(), 1);
    assert_eq!(m.bindings.len(), 1);
    assert_eq!(m.daemon_sets.len(), 1);
}

#[test]
fn the_daemon_set_runs_a_privileged_agent_on_every_node_with_its_probes() {
    let m = deploy::load().unwrap();
    let ds = &m.daemon_sets[0];
    let sa = &m.service_accounts[0];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, None, "hostPID is not needed");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    let c = &pod.containers[0];
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .unwrap();
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");

    // bpffs from the host, shared both ways (pins must outlive the pod).
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.mount_path == "/sys/fs/bpf")
        .unwrap();
    assert_eq!(mount.mount_propagation.as_deref(), Some("Bidirectional"));
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(vol.host_path.as_ref().unwrap().path, "/sys/fs/bpf");

    // Probes on the agent's status endpoint, at the port --http-addr sets.
    let args = c.args.clone().unwrap();
    let http = args
        .iter()
        .find_map(|a| a.strip_prefix("--http-addr="))
        .unwrap();
    let port: i32 = http.rsplit(':').next().unwrap().parse().unwrap();
    for (probe, path) in [
        (&c.liveness_probe, "/livez"),
        (&c.startup_probe, "/livez"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
        );
    }
    // Every flag the DaemonSet passes is one `lb run` has.
    let help = Command::new(lb_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert_eq!(args[0], "run");
    for a in &args[1..] {
        let flag = a.split('=').next().unwrap();
        assert!(help.contains(flag), "lb run has no {flag}:\n{help}");
    }
}

/// The same manifest drops into any cluster: no interface name, no address.
#[test]
fn the_daemon_set_names_no_interface_and_no_address() {
    let m = deploy::load().unwrap();
    let pod = m.daemon_sets[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    for a in &args {
        assert!(
            !a.contains("iface"),
            "{a}: the agent follows every interface"
        );
        assert!(
            !a.starts_with("--node-ip"),
            "{a}: NodePort addresses come from the Node"
        );
        assert!(!a.contains("host-only"), "{a}: pods get socket LB");
    }
    assert!(args.contains(&"--cgroup=/sys/fs/cgroup".to_string()));
    let text = std::fs::read_to_string(deploy::deploy_dir().join("daemonset.yaml")).unwrap();
    for iface in [
        "eth0", "ens", "enp", "eno", "bond0", "cni0", "cali", "lxc", "veth",
    ] {
        let named = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains(iface));
        assert!(!named, "the DaemonSet names {iface}");
    }
    // The API server's address from a ConfigMap the user creates once, not
    // written into the manifest.
    assert!(!c
        .env
        .iter()
        .flatten()
        .any(|e| e.name.starts_with("KUBERNETES_SERVICE")));
    let from = c.env_from.as_ref().unwrap()[0]
        .config_map_ref
        .as_ref()
        .unwrap();
    assert_eq!(from.name, "lb-api-server");
}

#[test]
fn the_binding_gives_the_role_to_the_agents_service_account() {
    let m = deploy::load().unwrap();
    let (sa, role, b) = (&m.service_accounts[0], &m.cluster_roles[0], &m.bindings[0]);
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&b.role_ref.name), role.metadata.name.as_ref());
    let subject = &b.subjects.as_ref().unwrap()[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace, sa.metadata.namespace);
    let ds = &m.daemon_sets[0];
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
}

#[test]
fn the_dockerfile_is_multi_stage_and_builds_with_the_projects_commands() {
    let text = std::fs::read_to_string(deploy::deploy_dir().join("Dockerfile")).unwrap();
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "{stages} stages");
    assert!(text.contains("cargo xtask build-ebpf"));
    assert!(text.contains("COPY --from=build"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/lb\"]"));
}
