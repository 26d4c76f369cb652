//! Loopback connections that go dark: every packet of them dropped, both ways, while new
//! connections to the same port get through. This is what a client sees when a NAT or a load
//! balancer forgets a connection, or a server's host vanishes: no FIN, no RST, and the
//! kernel's own retransmissions give up only after many minutes.
//!
//! A relay that stops forwarding cannot stand in for it: its kernel still acknowledges what
//! the client sends, which is exactly what hides a dead peer. This uses `iptables` rules on
//! the connections' own port pairs (root, and the `iptables` binary: `scripts/test` installs
//! it), removed on drop.

use std::process::Command;

/// The connections a [`Blackhole`] was made for, dark until it is dropped.
#[derive(Debug)]
pub struct Blackhole {
    /// `iptables` rule specifications, as inserted.
    rules: Vec<Vec<String>>,
    local_ports: Vec<u16>,
}

impl Blackhole {
    /// Darkens every established loopback TCP connection to `port` that exists now.
    ///
    /// # Panics
    /// When `ss` or `iptables` is missing or fails (not root, no netfilter): a test that needs
    /// a blackhole fails rather than skips.
    pub fn connections_to(port: u16) -> Blackhole {
        let local_ports = established_local_ports(port);
        let mut hole = Blackhole {
            rules: Vec::new(),
            local_ports: local_ports.clone(),
        };
        for local in local_ports {
            for (sport, dport) in [(local, port), (port, local)] {
                let rule: Vec<String> =
                    ["-p", "tcp", "-s", "127.0.0.1", "-d", "127.0.0.1", "--sport"]
                        .iter()
                        .map(|s| (*s).to_owned())
                        .chain([
                            sport.to_string(),
                            "--dport".into(),
                            dport.to_string(),
                            "-j".into(),
                            "DROP".into(),
                        ])
                        .collect();
                iptables("-I", &rule);
                hole.rules.push(rule);
            }
        }
        hole
    }

    /// The client-side ports of the darkened connections.
    pub fn local_ports(&self) -> &[u16] {
        &self.local_ports
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        for rule in &self.rules {
            let mut args = vec!["-D".to_owned(), "INPUT".to_owned()];
            args.extend(rule.iter().cloned());
            let _ = Command::new("iptables").args(&args).status();
        }
    }
}

fn iptables(op: &str, rule: &[String]) {
    let out = Command::new("iptables")
        .arg(op)
        .arg("INPUT")
        .args(rule)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run iptables ({e}): install it (apt-get install iptables) and run as root"
            )
        });
    assert!(
        out.status.success(),
        "iptables {op} INPUT {} failed (root and netfilter needed): {}",
        rule.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The local ports of established TCP connections from 127.0.0.1 to 127.0.0.1:`port`.
fn established_local_ports(port: u16) -> Vec<u16> {
    let out = Command::new("ss")
        .args(["-tnH", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run ss ({e}): install iproute2"));
    assert!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peer = format!("127.0.0.1:{port}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // Recv-Q Send-Q Local:Port Peer:Port [Process]
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (local, remote) = (cols.get(2)?, cols.get(3)?);
            if *remote != peer {
                return None;
            }
            local.strip_prefix("127.0.0.1:")?.parse().ok()
        })
        .collect()
}
