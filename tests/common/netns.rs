//! A private network of network namespaces on this machine: one namespace per member (a node
//! plugin, the router, a benchmark's sender…), each joined by a veth pair to a bridge in a
//! "switch" namespace of its own. Every member reaches every other one over real TCP on
//! addresses of the test's own, and nothing reaches the outside: no interface, address, route
//! or sysctl of the root namespace is touched, and no member has a route beyond its /24.
//!
//! Names are the test's own (`lv<pid>x<counter><tag><member>`, the netns name; the interfaces are
//! `eth0` in a member and `p<index>` in the switch, names that are private to their namespace,
//! so IFNAMSIZ never bites and no two tests can collide). Because each network is sealed in its
//! own namespaces, two tests that happened to pick the same subnet would not even see each
//! other; the subnet is still derived from the pid and counter, so logs tell them apart.
//!
//! Everything is deleted on drop, even after a panic: deleting a namespace deletes the veth
//! ends inside it, and with them their peers. Only std, libc and the `ip`/`nsenter` tools are
//! used, so the benchmark harness includes this file too (`#[path]`).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One member of a [`Lan`]: its namespace and its address.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl Member {
    /// The namespace's file, as `nsenter --net=` and setns(2) take it.
    pub fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.ns))
    }

    /// `program` to be run inside this member's network namespace (and nothing else changed:
    /// unlike `ip netns exec`, `nsenter --net` keeps the caller's mount namespace, so mounts
    /// a node plugin makes still propagate the way its container's would).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns_path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Run `f` on a thread of its own that has joined this member's network namespace
    /// (setns(2) moves only the calling thread; a socket keeps the namespace it was made in,
    /// wherever it is used afterwards).
    pub fn spawn_in<T, E>(
        &self,
        f: impl FnOnce() -> Result<T, E> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T, E>>
    where
        T: Send + 'static,
        E: From<std::io::Error> + Send + 'static,
    {
        let ns = self.ns_path();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&ns)?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            // SAFETY: a plain syscall on a descriptor we own; it changes only this thread.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            f()
        })
    }

    /// Bytes received on this member's interface since it was made (the kernel's counter,
    /// what came over the wire: payload and every header of every layer).
    pub fn rx_bytes(&self) -> u64 {
        let json = ip_in(&self.ns, &["-j", "-s", "link", "show", "dev", "eth0"]);
        let key = "\"rx\":{\"bytes\":";
        let at = json.find(key).expect("rx counter in ip's output") + key.len();
        json[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .expect("a byte count")
    }

    /// A TCP connection to `to` made from inside this member's namespace.
    pub fn connect(&self, to: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
        self.spawn_in(move || {
            std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(5))
        })
        .join()
        .expect("connect thread")
    }
}

/// A switch namespace with a bridge, and the members plugged into it.
#[derive(Debug)]
pub struct Lan {
    prefix: String,
    switch: String,
    pub members: Vec<Member>,
    /// The /24 every member has an address in: `a.b.c.0/24`.
    pub subnet: [u8; 3],
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip -n NS …`, output as text.
pub fn ip_in(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {ns} {}: {:?}",
        args.join(" "),
        out
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Lan {
    /// A network of `members` (short names, e.g. `n1`, `r`); member k gets `a.b.c.(k+1)`.
    pub fn new(members: &[&str]) -> Result<Lan, String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // 10.x.y.0/24 from the pid and counter, away from 10.0.x (the commonest real LAN).
        let h = pid
            .wrapping_mul(2654435761)
            .wrapping_add(n.wrapping_mul(40503));
        let subnet = [10, 1 + (h >> 8) as u8 % 254, h as u8];
        // The pid and counter make the names unique among the processes of this pid namespace;
        // a random tag makes them unique across pid namespaces sharing /run/netns too. A name
        // taken all the same is someone else's: never deleted, another one is tried.
        let mut lan = None;
        for _ in 0..8 {
            let tag = random_tag();
            let switch = format!("lv{pid}x{n}{tag}sw");
            if ip(&["netns", "add", &switch]).is_ok() {
                lan = Some(Lan {
                    prefix: format!("lv{pid}x{n}{tag}"),
                    switch,
                    members: Vec::new(),
                    subnet,
                });
                break;
            }
        }
        let mut lan = lan.ok_or("no free network namespace name")?;
        ip(&["-n", &lan.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lan.switch, "link", "set", "br0", "up"])?;
        for (k, name) in members.iter().enumerate() {
            let ns = format!("{}{name}", lan.prefix);
            ip(&["netns", "add", &ns])?;
            let member = Member {
                name: name.to_string(),
                ns: ns.clone(),
                ip: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], k as u8 + 1),
            };
            lan.members.push(member.clone());
            let port = format!("p{k}");
            // Both ends are created inside their namespaces: nothing ever appears in the root's.
            ip(&[
                "-n",
                &lan.switch,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns,
            ])?;
            ip(&["-n", &lan.switch, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &lan.switch, "link", "set", &port, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let addr = format!("{}/24", member.ip);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(lan)
    }

    pub fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no member {name} in {:?}", self.members))
    }

    /// Every member sees only `lo` and `eth0`, and routes only its /24: no way out. Nothing
    /// of the network exists in the root namespace.
    pub fn assert_sealed(&self) {
        let net = format!(
            "{}.{}.{}.0/24",
            self.subnet[0], self.subnet[1], self.subnet[2]
        );
        for m in &self.members {
            let links: Vec<String> = ip_in(&m.ns, &["-o", "link", "show"])
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .map(|n| n.split('@').next().unwrap().to_string())
                .collect();
            assert_eq!(links, ["lo", "eth0"], "links of {}", m.ns);
            let routes = ip_in(&m.ns, &["-4", "route", "show"]);
            let routes: Vec<&str> = routes.lines().collect();
            assert_eq!(routes.len(), 1, "routes of {}: {routes:?}", m.ns);
            assert!(
                routes[0].starts_with(&net),
                "routes of {}: {routes:?}",
                m.ns
            );
        }
        let root = Command::new("ip").args(["-o", "addr", "show"]).output();
        let root = String::from_utf8_lossy(&root.expect("run ip").stdout).into_owned();
        let ours = format!(" {}.{}.{}.", self.subnet[0], self.subnet[1], self.subnet[2]);
        assert!(
            !root.contains(&format!("inet{ours}")),
            "an address of the test's network in the root namespace:\n{root}"
        );
    }
}

/// Four hex digits that differ between processes and calls (std's randomly keyed hasher).
fn random_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:04x}", h.finish() as u16)
}

impl Drop for Lan {
    fn drop(&mut self) {
        for m in &self.members {
            let _ = ip(&["netns", "del", &m.ns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

/// Sockets in TCP LISTEN state in the network namespace whose `/proc/…/net/tcp` this is
/// (`/proc/self/net/tcp`: the caller's; `/proc/<pid>/net/tcp`: that process's), as
/// (address, port).
pub fn tcp_listeners(proc_net_tcp: &std::path::Path) -> Vec<(Ipv4Addr, u16)> {
    let text = std::fs::read_to_string(proc_net_tcp).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // 0A: TCP_LISTEN.
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (a, p) = f.get(1)?.split_once(':')?;
            let a = u32::from_str_radix(a, 16).ok()?;
            let p = u16::from_str_radix(p, 16).ok()?;
            // The kernel prints the network-order address as a native u32.
            Some((Ipv4Addr::from(a.to_ne_bytes()), p))
        })
        .collect()
}
