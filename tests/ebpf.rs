//! The eBPF datapath (`"datapath": "ebpf"`) with real sockets: a REDIRECT-style
//! listener reading SO_ORIGINAL_DST, a peer namespace playing the internet
//! whose arrivals are counted, and the daemon attaching its programs at the
//! root of a cgroup namespace of the test's own (never the host's root).

mod support;

use std::path::PathBuf;

use support::*;

/// A configuration for the eBPF datapath (see [`Lab::write_config`]).
fn ebpf_config(lab: &Lab, file: &str, tproxies: &str, rules: &str) -> PathBuf {
    let p = lab.write_config(file, tproxies, rules);
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        text.replacen(r#""version":1,"#, r#""version":1,"datapath":"ebpf","#, 1),
    )
    .unwrap();
    p
}

/// `proxy/direct` direct, the rest of `proxy` proxied, `drop` dropped.
fn rules(lab: &Lab) -> String {
    format!(
        r#"[{{"match":"{}","direct":true}},{{"match":"{}","tproxy":"proxy"}},{{"match":"{}","drop":true}}]"#,
        lab.re("proxy/direct"),
        lab.re("proxy"),
        lab.re("drop"),
    )
    .replace('\\', "\\\\")
}

fn redirected(answer: &str, dst: &str) -> bool {
    answer == format!("proxy {dst} {PEER_PORT}")
}

#[test]
fn ebpf_redirects_tcp_refuses_drop_and_udp_and_detaches_on_stop() {
    in_cgroup_namespace(
        "ebpf_redirects_tcp_refuses_drop_and_udp_and_detaches_on_stop",
        || {
            let mut lab = Lab::new("ebpf");
            lab.start_redirect_listener("svc", PROXY_PORT, "proxy");
            install_counter(lab.peer_pid());
            for rel in ["proxy", "proxy/direct", "drop", "other"] {
                lab.mkcg(rel);
            }
            let cfg = ebpf_config(&lab, "ebpf.json", &proxy_target(), &rules(&lab));
            lab.start_daemon(&cfg);

            // Proxied: TCP v4 and v6 reach the listener with their original
            // destination, and nothing reaches the peer.
            assert!(redirected(
                &lab.talk("proxy", "tcp", PEER4, PEER_PORT),
                PEER4
            ));
            assert!(redirected(
                &lab.talk("proxy", "tcp", PEER6, PEER_PORT),
                PEER6
            ));
            // A cgroup created later, nested below a classified one.
            lab.mkcg("proxy/late/deeper");
            assert!(redirected(
                &lab.talk("proxy/late/deeper", "tcp", PEER4, PEER_PORT),
                PEER4
            ));
            assert_eq!(counted(lab.peer_pid()), 0, "proxied traffic leaked");

            // UDP of a target is refused (EPERM), as is all of a dropped cgroup.
            assert_eq!(
                lab.talk("proxy", "udp", PEER4, PEER_PORT),
                "ERR PermissionError 1"
            );
            assert_eq!(
                lab.talk("proxy", "udp", PEER6, PEER_PORT),
                "ERR PermissionError 1"
            );
            assert_eq!(
                lab.talk("drop", "tcp", PEER4, PEER_PORT),
                "ERR PermissionError 1"
            );
            assert_eq!(
                lab.talk("drop", "udp", PEER6, PEER_PORT),
                "ERR PermissionError 1"
            );
            assert_eq!(counted(lab.peer_pid()), 0, "refused traffic leaked");

            // Direct (a classified exception below a proxied cgroup) and
            // unclassified go straight to the peer.
            assert!(
                lab.talk("proxy/direct", "tcp", PEER4, PEER_PORT)
                    .starts_with("peer")
            );
            assert!(
                lab.talk("other", "udp", PEER6, PEER_PORT)
                    .starts_with("peer")
            );
            assert!(counted(lab.peer_pid()) > 0, "direct traffic did not arrive");

            // A clean stop detaches everything: the same cgroup goes direct.
            let d = lab.take_daemon();
            assert_eq!(d.stop(), 0);
            assert!(
                lab.talk("proxy", "tcp", PEER4, PEER_PORT)
                    .starts_with("peer")
            );
            assert!(
                lab.talk("drop", "udp", PEER4, PEER_PORT)
                    .starts_with("peer")
            );
        },
    );
}
