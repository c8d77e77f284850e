//! Test hosts in network namespaces, for partitions: each host is a namespace with one veth
//! to a router namespace, which forwards between them and to the test process (in the root
//! namespace, on a veth of its own). A cut is a policy-routing rule in the router that drops
//! one direction between two hosts silently (`ip rule ... blackhole`), as a broken link or a
//! firewall would; the test process keeps reaching every host, as clients do.
//!
//! Needs root and iproute2. Everything is removed on drop (deleting the namespaces deletes
//! their veths and the root namespace's route through them); namespaces left by a test
//! process that died are removed by the next one.
#![allow(dead_code)]

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::process::Command;

/// Every name this module makes starts with it.
const PREFIX: &str = "rlt";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e} (is iproute2 installed?)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e} (network namespace tests need root)");
    }
}

/// Remove namespaces left by test processes that no longer run.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
}

/// `hosts` hosts and a router; host `i` has address `10.<subnet>.<i+1>.2`.
pub struct Net {
    tag: String,
    subnet: u8,
    hosts: usize,
    /// The cuts in place: (from, to).
    cuts: RefCell<Vec<(usize, usize)>>,
}

impl Net {
    pub fn new(hosts: usize) -> Net {
        assert!(hosts < 200);
        remove_stale();
        use std::hash::{BuildHasher, Hasher};
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        // A subnet no route of this machine uses yet.
        let routes = String::from_utf8(
            Command::new("ip")
                .args(["-4", "route", "show", "table", "all"])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        let subnet = (0..100u8)
            .map(|k| 100 + ((r as u8).wrapping_add(k) % 100))
            .find(|s| !routes.contains(&format!("10.{s}.")))
            .expect("a free 10.x.0.0/16");
        let net = Net {
            tag: format!("{:04x}", (r >> 16) as u16),
            subnet,
            hosts,
            cuts: RefCell::new(Vec::new()),
        };
        net.build();
        net
    }

    fn name(&self, what: &str) -> String {
        format!("{PREFIX}{}-{}-{what}", self.tag, std::process::id())
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> String {
        self.name(&i.to_string())
    }

    fn router(&self) -> String {
        self.name("r")
    }

    /// Host `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, i as u8 + 1, 2)
    }

    fn build(&self) {
        let r = self.router();
        must(&["netns", "add", &r]);
        must(&["-n", &r, "link", "set", "lo", "up"]);
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let s = self.subnet;
        for i in 0..self.hosts {
            let ns = self.ns(i);
            let (h, rv) = (
                format!("{PREFIX}{}h{i}", self.tag),
                format!("{PREFIX}{}r{i}", self.tag),
            );
            must(&["netns", "add", &ns]);
            must(&["-n", &ns, "link", "set", "lo", "up"]);
            must(&["link", "add", &h, "type", "veth", "peer", "name", &rv]);
            must(&["link", "set", &h, "netns", &ns]);
            must(&["link", "set", &rv, "netns", &r]);
            let n = i + 1;
            must(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.{s}.{n}.2/24"),
                "dev",
                &h,
            ]);
            must(&[
                "-n",
                &r,
                "addr",
                "add",
                &format!("10.{s}.{n}.1/24"),
                "dev",
                &rv,
            ]);
            must(&["-n", &ns, "link", "set", &h, "up"]);
            must(&["-n", &r, "link", "set", &rv, "up"]);
            must(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.{s}.{n}.1"),
            ]);
        }
        // The test process's own link to the router.
        let (h, rv) = (
            format!("{PREFIX}{}hc", self.tag),
            format!("{PREFIX}{}rc", self.tag),
        );
        must(&["link", "add", &h, "type", "veth", "peer", "name", &rv]);
        must(&["link", "set", &rv, "netns", &r]);
        must(&["addr", "add", &format!("10.{s}.0.2/24"), "dev", &h]);
        must(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("10.{s}.0.1/24"),
            "dev",
            &rv,
        ]);
        must(&["link", "set", &h, "up"]);
        must(&["-n", &r, "link", "set", &rv, "up"]);
        must(&[
            "route",
            "add",
            &format!("10.{s}.0.0/16"),
            "via",
            &format!("10.{s}.0.1"),
        ]);
    }

    fn rule(&self, verb: &str, from: usize, to: usize) -> Result<(), String> {
        ip(&[
            "-n",
            &self.router(),
            "rule",
            verb,
            "from",
            &self.ip(from).to_string(),
            "to",
            &self.ip(to).to_string(),
            "blackhole",
        ])
    }

    /// Drop every packet from host `from` to host `to` (one direction).
    pub fn cut(&self, from: usize, to: usize) {
        if !self.cuts.borrow().contains(&(from, to)) {
            self.rule("add", from, to).unwrap();
            self.cuts.borrow_mut().push((from, to));
        }
    }

    /// Cut host `i` off from every other host, both ways (the test process still reaches it).
    pub fn isolate(&self, i: usize) {
        for j in (0..self.hosts).filter(|j| *j != i) {
            self.cut(i, j);
            self.cut(j, i);
        }
    }

    /// Remove every cut.
    pub fn heal(&self) {
        for (from, to) in self.cuts.borrow_mut().drain(..) {
            self.rule("del", from, to).unwrap();
        }
    }

    /// A command that runs `program` inside host `i`.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i), program]);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["netns", "del", &self.router()]);
        let _ = ip(&["link", "del", &format!("{PREFIX}{}hc", self.tag)]);
    }
}
