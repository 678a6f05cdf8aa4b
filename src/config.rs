//! Configuration: the JSON schema (version 1, cgtproxy's kebab-case keys) and its
//! validation. Every error names the offending key so a user can find it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use regex::Regex;
use serde::Deserialize;

/// Where `run`, `check`, `render` and `exec` look when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/cgtproxy/config.json";

/// The built-in configuration used when the default file is absent: the slice
/// convention of black-desk/cgtproxy, one TPROXY target on port 7893.
pub const BUILTIN: &str = r#"{
  "version": 1,
  "cgroup-root": "AUTO",
  "route-table": 300,
  "bypass": [
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "224.0.0.0/4", "255.255.255.255/32",
    "::1/128", "fc00::/7", "fe80::/10", "ff00::/8"
  ],
  "tproxies": {
    "proxy": { "port": 7893, "mark": 7893 }
  },
  "rules": [
    { "match": "/cgtproxy-direct\\.slice(/|$)", "direct": true },
    { "match": "/cgtproxy-drop\\.slice(/|$)", "drop": true },
    { "match": "/cgtproxy-proxy\\.slice(/|$)", "tproxy": "proxy" }
  ]
}"#;

/// A configuration error; the message always names the key or step at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {key}: {msg}")]
    Parse {
        origin: String,
        key: String,
        msg: String,
    },
    #[error("{origin}: {}", .problems.join("; "))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    version: u32,
    #[serde(default = "auto")]
    cgroup_root: String,
    #[serde(default = "default_route_table")]
    route_table: u32,
    table: Option<String>,
    #[serde(default = "default_rule_priority")]
    rule_priority: u32,
    #[serde(default)]
    bypass: Vec<String>,
    #[serde(default)]
    tproxies: BTreeMap<String, RawTarget>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    interfaces: Vec<RawRule>,
    #[serde(default)]
    datapath: Datapath,
}

impl std::fmt::Display for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Datapath::Nft => "nft",
            Datapath::Ebpf => "ebpf",
        })
    }
}

/// How classified sockets are routed (key `datapath`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Datapath {
    /// The nftables table and policy routing, for TPROXY listeners.
    #[default]
    Nft,
    /// cgroup socket hooks redirecting `connect()` to REDIRECT-style listeners
    /// (`SO_ORIGINAL_DST`); no marks, routes or table.
    Ebpf,
}

fn auto() -> String {
    "AUTO".to_owned()
}

fn default_route_table() -> u32 {
    300
}

/// The default priority of our ip rules: ahead of every VPN and mesh client that
/// installs its rules at a priority of its own (Tailscale 5210–5270, sing-box's
/// and mihomo's `auto-route` 9000 and up, rules added to a stock system without a
/// priority: 32765 downwards), with room below for the daemon to step ahead of a
/// rule added later without one (see `precedence`).
pub const DEFAULT_RULE_PRIORITY: u32 = 100;

fn default_rule_priority() -> u32 {
    DEFAULT_RULE_PRIORITY
}

/// Marks that other software on the same host routes by, which a target must not
/// use: its packets would be taken by their rules. (mark, mask, whose).
const FOREIGN_MARKS: &[(u32, u32, &str)] = &[
    // wg-quick's default fwmark and table (its `not fwmark 51820` rule).
    (51820, u32::MAX, "WireGuard's (wg-quick) fwmark 51820"),
    // Tailscale's bypass and subnet-route marks, matched under mask 0xff0000.
    (
        0x40000,
        0xff0000,
        "Tailscale's fwmark bits 0x40000/0xff0000",
    ),
    (
        0x80000,
        0xff0000,
        "Tailscale's fwmark bits 0x80000/0xff0000",
    ),
    // Mullvad's fwmark ("mole").
    (0x6d6f_6c65, u32::MAX, "Mullvad's fwmark 0x6d6f6c65"),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawTarget {
    port: u16,
    mark: u32,
    #[serde(default)]
    no_udp: bool,
    #[serde(default)]
    no_ipv6: bool,
    dns_hijack: Option<RawDnsHijack>,
    upstream: Option<String>,
    upstream_auth_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDnsHijack {
    ip: Option<String>,
    ip6: Option<String>,
    #[serde(default = "dns_port")]
    port: u16,
    #[serde(default)]
    tcp: bool,
    #[serde(default)]
    stub: bool,
}

fn dns_port() -> u16 {
    53
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRule {
    #[serde(rename = "match")]
    pattern: String,
    tproxy: Option<String>,
    direct: Option<bool>,
    drop: Option<bool>,
}

/// Where the cgroup2 hierarchy is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupRoot {
    /// Found from `/proc/self/mountinfo`.
    Auto,
    /// An explicit mount point, checked to be cgroup2 at start.
    Path(PathBuf),
}

/// DNS redirection of one target's port-53 traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsHijack {
    pub ip: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    pub port: u16,
    pub tcp: bool,
    /// Also redirect this target's queries to systemd-resolved's stub
    /// ([`RESOLVED_STUB`]), which the bypass list would otherwise exempt.
    pub stub: bool,
}

/// The fwmark of the built-in forwarder's own upstream connections: the output
/// chain returns early for it, so they are never captured, whatever the rules say.
/// No target may use it. The value spells "cgtf".
pub const FORWARD_MARK: u32 = 0x6367_7466;

/// Marks the classify chain gives direct and dropped cgroups' packets for a moment
/// (see `table::class`); no target may use them.
pub const DIRECT_CLASS: u32 = 0x6367_7401;
pub const DROP_CLASS: u32 = 0x6367_7402;

/// Connection marks (`ct mark`) the output chain gives a connection it let
/// leave unmarked: [`CONN_TAG_BASE`] plus the table's generation in the low
/// 16 bits ([`CONN_TAG_MASK`] selects the rest). Such a connection's later
/// packets skip classification until the table changes (see
/// `table::output_chain`), so no target may carry one as its mark: its
/// connections would be taken for decided-direct ones.
pub const CONN_TAG_BASE: u32 = 0x6368_0000;
pub const CONN_TAG_MASK: u32 = 0xffff_0000;

/// systemd-resolved's stub listener.
pub const RESOLVED_STUB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

/// An upstream proxy for the built-in forwarder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    Socks5(String),
    Http(String),
}

/// One TPROXY target (a listener of a proxy core).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub port: u16,
    pub mark: u32,
    pub no_udp: bool,
    pub no_ipv6: bool,
    pub dns_hijack: Option<DnsHijack>,
    pub upstream: Option<Upstream>,
    pub upstream_auth_file: Option<PathBuf>,
}

/// What a matched cgroup's traffic gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Direct,
    Drop,
    /// Index into [`Config::targets`] (small: the planner keeps one per cgroup).
    Tproxy(u16),
}

/// One classification rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub regex: Regex,
    pub action: Action,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub cgroup_root: CgroupRoot,
    pub route_table: u32,
    pub table: String,
    /// The priority our ip rules are installed at (unless a foreign rule makes the
    /// daemon step ahead of it).
    pub rule_priority: u32,
    /// Bypass destinations, v4 and v6 mixed, as given.
    pub bypass: Vec<IpNet>,
    /// Sorted by name, so indices are stable for equal configs.
    pub targets: Vec<Target>,
    pub rules: Vec<Rule>,
    /// Gateway mode: rules on the names of the interfaces forwarded traffic
    /// arrives on.
    pub interfaces: Vec<Rule>,
    pub datapath: Datapath,
}

impl Config {
    /// Parses and validates a configuration; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Parse {
                origin: origin.to_owned(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                msg: e.into_inner().to_string(),
            }
        })?;
        validate(raw).map_err(|problems| ConfigError::Invalid {
            origin: origin.to_owned(),
            problems,
        })
    }

    /// Loads `path`, or the built-in config when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            None => Config::parse(BUILTIN, "built-in config"),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                Config::parse(&text, &p.display().to_string())
            }
        }
    }

    /// The first rule matching `path` (relative to the cgroup2 root, leading `/`).
    pub fn classify(&self, path: &str) -> Option<Action> {
        if path == "/" {
            return None;
        }
        self.rules
            .iter()
            .find(|r| r.regex.is_match(path))
            .map(|r| r.action)
    }

    /// The first `interfaces` rule matching interface `name`, with its index.
    pub fn classify_interface(&self, name: &str) -> Option<(usize, Action)> {
        self.interfaces
            .iter()
            .position(|r| r.regex.is_match(name))
            .map(|i| (i, self.interfaces[i].action))
    }

    /// True when the kernel-facing parts (everything but the rules) are equal, so a
    /// reload can keep the table and only change elements.
    pub fn same_structure(&self, other: &Config) -> bool {
        self.route_table == other.route_table
            && self.rule_priority == other.rule_priority
            && self.table == other.table
            && self.bypass == other.bypass
            && self.targets == other.targets
            && self.cgroup_root == other.cgroup_root
            && self.datapath == other.datapath
    }
}

/// Resolves the config path of `run`/`check`/`render`/`exec`: an explicit one, else
/// `$CONFIGURATION_DIRECTORY/config.json` or [`DEFAULT_PATH`]; `None` means the
/// default file is absent and the built-in config applies.
pub fn resolve_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_owned());
    }
    let default = match std::env::var_os("CONFIGURATION_DIRECTORY") {
        // systemd may pass several directories separated by ':'; ours is the first.
        Some(dirs) => {
            let first = dirs
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            Path::new(&first).join("config.json")
        }
        None => PathBuf::from(DEFAULT_PATH),
    };
    default.exists().then_some(default)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_upstream(s: &str) -> Option<Upstream> {
    let (scheme, rest) = s.split_once("://")?;
    let (host, port) = rest.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().ok()? == 0 {
        return None;
    }
    match scheme {
        "socks5" => Some(Upstream::Socks5(rest.to_owned())),
        "http" => Some(Upstream::Http(rest.to_owned())),
        _ => None,
    }
}

/// Parses a bypass entry: a CIDR or a bare host address.
pub fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

fn validate(raw: RawConfig) -> Result<Config, Vec<String>> {
    let mut errs = Vec::new();
    if raw.version != 1 {
        errs.push(format!(
            "version: unsupported version {}, expected 1",
            raw.version
        ));
    }
    let cgroup_root = if raw.cgroup_root == "AUTO" {
        CgroupRoot::Auto
    } else if raw.cgroup_root.starts_with('/') {
        CgroupRoot::Path(PathBuf::from(&raw.cgroup_root))
    } else {
        errs.push(format!(
            "cgroup-root: {:?} is neither \"AUTO\" nor an absolute path",
            raw.cgroup_root
        ));
        CgroupRoot::Auto
    };
    if matches!(raw.route_table, 0 | 253..=255) {
        errs.push(format!(
            "route-table: {} is reserved (use 1..=252 or a number above 255)",
            raw.route_table
        ));
    }
    if !(1..=32765).contains(&raw.rule_priority) {
        errs.push(format!(
            "rule-priority: {} is outside 1..=32765 (0 is the local table's, 32766 and 32767 main's and default's)",
            raw.rule_priority
        ));
    }
    let table = raw.table.unwrap_or_else(|| "cgtproxy".to_owned());
    if !valid_name(&table) {
        errs.push(format!(
            "table: {table:?} must be 1 to 64 letters, digits, '_' or '-'"
        ));
    }
    let mut bypass = Vec::new();
    for (i, b) in raw.bypass.iter().enumerate() {
        match parse_net(b) {
            Some(n) => bypass.push(n),
            None => errs.push(format!("bypass[{i}]: {b:?} is not an IP address or CIDR")),
        }
    }

    let mut targets = Vec::new();
    let mut marks: BTreeMap<u32, String> = BTreeMap::new();
    for (name, t) in raw.tproxies {
        let key = format!("tproxies.{name}");
        if !valid_name(&name) || name == "direct" || name == "drop" {
            errs.push(format!(
                "{key}: a target name is 1 to 64 letters, digits, '_' or '-', and not \"direct\" or \"drop\""
            ));
        }
        if t.port == 0 {
            errs.push(format!("{key}.port: must not be 0"));
        }
        if t.mark == 0 {
            errs.push(format!("{key}.mark: must not be 0"));
        } else if t.mark == FORWARD_MARK {
            errs.push(format!(
                "{key}.mark: {FORWARD_MARK:#x} is reserved for the built-in forwarder's own connections"
            ));
        } else if t.mark == DIRECT_CLASS || t.mark == DROP_CLASS {
            errs.push(format!(
                "{key}.mark: {:#x} is reserved for cgtproxy's direct and drop classes",
                t.mark
            ));
        } else if t.mark & CONN_TAG_MASK == CONN_TAG_BASE {
            errs.push(format!(
                "{key}.mark: {:#x} is reserved: {CONN_TAG_BASE:#x} to {:#x} are cgtproxy's connection marks",
                t.mark,
                CONN_TAG_BASE | !CONN_TAG_MASK
            ));
        } else if let Some((_, _, whose)) = FOREIGN_MARKS
            .iter()
            .find(|(m, mask, _)| t.mark & mask == *m)
        {
            errs.push(format!(
                "{key}.mark: {:#x} collides with {whose}; choose another mark",
                t.mark
            ));
        } else if let Some(other) = marks.insert(t.mark, name.clone()) {
            errs.push(format!(
                "{key}.mark: {} is already the mark of tproxies.{other}",
                t.mark
            ));
        }
        let dns_hijack = t.dns_hijack.map(|d| {
            let ip = d.ip.as_deref().and_then(|s| {
                s.parse::<Ipv4Addr>()
                    .map_err(|_| {
                        errs.push(format!("{key}.dns-hijack.ip: {s:?} is not an IPv4 address"))
                    })
                    .ok()
            });
            let ip6 = d.ip6.as_deref().and_then(|s| {
                s.parse::<Ipv6Addr>()
                    .map_err(|_| {
                        errs.push(format!(
                            "{key}.dns-hijack.ip6: {s:?} is not an IPv6 address"
                        ))
                    })
                    .ok()
            });
            if d.ip.is_none() && d.ip6.is_none() {
                errs.push(format!("{key}.dns-hijack: needs ip, ip6 or both"));
            }
            if d.port == 0 {
                errs.push(format!("{key}.dns-hijack.port: must not be 0"));
            }
            if d.stub && d.ip.is_none() {
                errs.push(format!(
                    "{key}.dns-hijack.stub: needs ip (the stub 127.0.0.53 is IPv4)"
                ));
            }
            DnsHijack {
                ip,
                ip6,
                port: d.port,
                tcp: d.tcp,
                stub: d.stub,
            }
        });
        let upstream = t.upstream.as_deref().and_then(|u| {
            let parsed = parse_upstream(u);
            if parsed.is_none() {
                errs.push(format!(
                    "{key}.upstream: {u:?} is not socks5://HOST:PORT or http://HOST:PORT"
                ));
            }
            parsed
        });
        if t.upstream_auth_file.is_some() && t.upstream.is_none() {
            errs.push(format!(
                "{key}.upstream-auth-file: given without an upstream"
            ));
        }
        targets.push(Target {
            name,
            port: t.port,
            mark: t.mark,
            no_udp: t.no_udp,
            no_ipv6: t.no_ipv6,
            dns_hijack,
            upstream,
            upstream_auth_file: t.upstream_auth_file,
        });
    }
    if targets.len() > usize::from(u16::MAX) {
        errs.push(format!(
            "tproxies: {} targets, at most 65535",
            targets.len()
        ));
    }

    let rules = validate_rules("rules", &raw.rules, &targets, &mut errs);
    let interfaces = validate_rules("interfaces", &raw.interfaces, &targets, &mut errs);
    if raw.datapath == Datapath::Ebpf {
        // What the eBPF datapath cannot do yet is refused, never ignored.
        if !interfaces.is_empty() {
            errs.push(
                "interfaces: forwarded traffic never meets the ebpf datapath's socket hooks; use \"datapath\": \"nft\" for gateway mode".into(),
            );
        }
        for t in targets.iter().filter(|t| t.dns_hijack.is_some()) {
            errs.push(format!(
                "tproxies.{}.dns-hijack: the ebpf datapath does not hijack DNS yet; use \"datapath\": \"nft\"",
                t.name
            ));
        }
    }

    if errs.is_empty() {
        Ok(Config {
            cgroup_root,
            route_table: raw.route_table,
            table,
            rule_priority: raw.rule_priority,
            bypass,
            targets,
            rules,
            interfaces,
            datapath: raw.datapath,
        })
    } else {
        Err(errs)
    }
}

/// Validates the rules of list `list` (`rules` or `interfaces`): a regex and
/// exactly one action naming a known target.
fn validate_rules(
    list: &str,
    raw: &[RawRule],
    targets: &[Target],
    errs: &mut Vec<String>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = format!("{list}[{i}]");
        let regex = match Regex::new(&r.pattern) {
            Ok(re) => Some(re),
            Err(e) => {
                errs.push(format!("{key}.match: bad regex: {e}"));
                None
            }
        };
        let mut actions = Vec::new();
        if let Some(name) = &r.tproxy {
            match targets
                .iter()
                .position(|t| &t.name == name)
                .and_then(|i| u16::try_from(i).ok())
            {
                Some(idx) => actions.push(Action::Tproxy(idx)),
                None => {
                    let known: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
                    errs.push(format!(
                        "{key}.tproxy: no target named {name:?} (known: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ));
                    actions.push(Action::Direct);
                }
            }
        }
        if r.direct == Some(true) {
            actions.push(Action::Direct);
        }
        if r.drop == Some(true) {
            actions.push(Action::Drop);
        }
        match actions.len() {
            0 => errs.push(format!(
                "{key}: needs exactly one action: \"tproxy\": NAME, \"direct\": true or \"drop\": true"
            )),
            1 => {}
            _ => errs.push(format!(
                "{key}: has several actions; give exactly one of tproxy, direct, drop"
            )),
        }
        if let (Some(regex), [action]) = (regex, actions.as_slice()) {
            rules.push(Rule {
                regex,
                action: *action,
            });
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, "t").unwrap_err().to_string()
    }

    const OK: &str = r#"{"version":1,"route-table":300,
        "tproxies":{"proxy":{"port":7893,"mark":3000}},
        "rules":[{"match":"^/a\\.slice$","tproxy":"proxy"},{"match":"b","drop":true},{"match":"c","direct":true}]}"#;

    #[test]
    fn builtin_config_is_valid() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.table, "cgtproxy");
        assert_eq!(c.targets[0].name, "proxy");
        assert_eq!(
            c.classify(
                "/user.slice/user-1000.slice/user@1000.service/cgtproxy-proxy.slice/x.scope"
            ),
            Some(Action::Tproxy(0))
        );
        assert_eq!(c.classify("/cgtproxy-drop.slice"), Some(Action::Drop));
        assert_eq!(c.classify("/cgtproxy-proxy.slicex"), None);
    }

    #[test]
    fn design_example_is_accepted() {
        let text = r#"{
          "version": 1, "cgroup-root": "AUTO", "route-table": 300, "table": "cgtproxy",
          "bypass": ["127.0.0.0/8", "::1/128"],
          "tproxies": { "proxy": { "port": 7893, "mark": 3000, "no-udp": false, "no-ipv6": false,
              "dns-hijack": { "ip": "127.0.0.1", "ip6": "::1", "port": 53, "tcp": false } } },
          "rules": [
            { "match": "^/system\\.slice/mihomo\\.service$", "direct": true },
            { "match": "/cgtproxy-drop\\.slice(/|$)", "drop": true },
            { "match": "/cgtproxy-proxy\\.slice(/|$)", "tproxy": "proxy" } ] }"#;
        let c = Config::parse(text, "t").unwrap();
        assert_eq!(
            c.targets[0].dns_hijack,
            Some(DnsHijack {
                ip: Some(Ipv4Addr::LOCALHOST),
                ip6: Some(Ipv6Addr::LOCALHOST),
                port: 53,
                tcp: false,
                stub: false
            })
        );
        assert_eq!(
            c.classify("/system.slice/mihomo.service"),
            Some(Action::Direct)
        );
    }

    #[test]
    fn first_matching_rule_wins_and_root_is_never_classified() {
        let c = Config::parse(OK, "t").unwrap();
        assert_eq!(c.classify("/a.slice"), Some(Action::Tproxy(0)));
        assert_eq!(c.classify("/bc"), Some(Action::Drop));
        assert_eq!(c.classify("/c"), Some(Action::Direct));
        assert_eq!(c.classify("/zzz"), None);
        assert_eq!(c.classify("/"), None);
    }

    #[test]
    fn datapath_defaults_to_nft_and_refuses_what_ebpf_cannot_do() {
        assert_eq!(Config::parse(OK, "t").unwrap().datapath, Datapath::Nft);
        let ebpf = OK.replacen("{", r#"{"datapath":"ebpf","#, 1);
        assert_eq!(Config::parse(&ebpf, "t").unwrap().datapath, Datapath::Ebpf);
        let e = err(&OK.replacen("{", r#"{"datapath":"xdp","#, 1));
        assert!(e.contains("datapath") && e.contains("ebpf"), "{e}");
        let gateway = ebpf.replacen(
            r#""rules":"#,
            r#""interfaces":[{"match":"lan0","drop":true}],"rules":"#,
            1,
        );
        assert!(err(&gateway).contains("interfaces: forwarded traffic"));
        let hijack = ebpf.replacen(
            r#""mark":3000"#,
            r#""mark":3000,"dns-hijack":{"ip":"127.0.0.1"}"#,
            1,
        );
        assert!(err(&hijack).contains("tproxies.proxy.dns-hijack: the ebpf datapath"));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = err(
            r#"{"version":1,"route-table":300,"tproxies":{"p":{"port":1,"mark":1,"colour":1}}}"#,
        );
        assert!(e.contains("tproxies.p") && e.contains("colour"), "{e}");
        let e = err(r#"{"version":1,"bogus":true}"#);
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = err(r#"{"version":1,"tproxies":{"p":{"port":"x","mark":1}}}"#);
        assert!(e.contains("tproxies.p.port"), "{e}");
        let e = err(r#"{"version":1,"tproxies":{"p":{"port":70000,"mark":1}}}"#);
        assert!(e.contains("tproxies.p.port"), "{e}");
    }

    #[test]
    fn version_must_be_one() {
        assert!(err(r#"{"version":2}"#).contains("version: unsupported version 2"));
        assert!(err(r#"{}"#).contains("version"));
    }

    #[test]
    fn bad_regex_is_reported_with_its_rule() {
        let e = err(r#"{"version":1,"rules":[{"match":"(","direct":true}]}"#);
        assert!(e.contains("rules[0].match: bad regex"), "{e}");
    }

    #[test]
    fn unknown_target_is_an_error_not_a_crash() {
        let e = err(
            r#"{"version":1,"tproxies":{"proxy":{"port":1,"mark":1}},"rules":[{"match":"a","direct":true},{"match":"x","tproxy":"nope"}]}"#,
        );
        assert!(
            e.contains(r#"rules[1].tproxy: no target named "nope" (known: proxy)"#),
            "{e}"
        );
    }

    #[test]
    fn rules_need_exactly_one_action() {
        let e = err(r#"{"version":1,"rules":[{"match":"a"}]}"#);
        assert!(e.contains("rules[0]: needs exactly one action"), "{e}");
        let e = err(r#"{"version":1,"rules":[{"match":"a","direct":true,"drop":true}]}"#);
        assert!(e.contains("rules[0]: has several actions"), "{e}");
        let e = err(r#"{"version":1,"rules":[{"match":"a","direct":false}]}"#);
        assert!(e.contains("rules[0]: needs exactly one action"), "{e}");
    }

    #[test]
    fn marks_must_be_nonzero_and_unique_ports_nonzero() {
        let e = err(
            r#"{"version":1,"tproxies":{"a":{"port":1,"mark":5},"b":{"port":2,"mark":5},"c":{"port":0,"mark":0}}}"#,
        );
        assert!(
            e.contains("tproxies.b.mark: 5 is already the mark of tproxies.a"),
            "{e}"
        );
        assert!(e.contains("tproxies.c.port: must not be 0"), "{e}");
        assert!(e.contains("tproxies.c.mark: must not be 0"), "{e}");
    }

    #[test]
    fn the_forwarders_mark_is_reserved() {
        let e = err(r#"{"version":1,"tproxies":{"p":{"port":1,"mark":1667724390}}}"#);
        assert!(e.contains("tproxies.p.mark: 0x63677466 is reserved"), "{e}");
    }

    #[test]
    fn the_class_marks_are_reserved() {
        let e = err(r#"{"version":1,"tproxies":{"p":{"port":1,"mark":1667724289}}}"#);
        assert!(e.contains("tproxies.p.mark: 0x63677401 is reserved"), "{e}");
    }

    #[test]
    fn the_connection_marks_are_reserved() {
        for mark in [0x6368_0000u32, 0x6368_ffff] {
            let e = err(&format!(
                r#"{{"version":1,"tproxies":{{"p":{{"port":1,"mark":{mark}}}}}}}"#
            ));
            assert!(
                e.contains(&format!("tproxies.p.mark: {mark:#x} is reserved")),
                "{e}"
            );
        }
        assert!(
            Config::parse(
                r#"{"version":1,"tproxies":{"p":{"port":1,"mark":1667760127}}}"#,
                "t"
            )
            .is_ok(),
            "0x6367ffff, just below, is a target's to take"
        );
    }

    #[test]
    fn marks_that_vpn_and_mesh_clients_route_by_are_refused() {
        for (mark, whose) in [
            (51820, "WireGuard"),
            (0x80000, "Tailscale"),
            (0x4_4321, "Tailscale"),
            (0x6d6f_6c65, "Mullvad"),
        ] {
            let e = err(&format!(
                r#"{{"version":1,"tproxies":{{"p":{{"port":1,"mark":{mark}}}}}}}"#
            ));
            assert!(e.contains("tproxies.p.mark:") && e.contains(whose), "{e}");
        }
        Config::parse(
            r#"{"version":1,"tproxies":{"p":{"port":1,"mark":51821}}}"#,
            "t",
        )
        .unwrap();
    }

    #[test]
    fn rule_priority_defaults_ahead_of_vpn_rules_and_is_bounded() {
        let c = Config::parse(r#"{"version":1}"#, "t").unwrap();
        assert_eq!(c.rule_priority, DEFAULT_RULE_PRIORITY);
        const { assert!(DEFAULT_RULE_PRIORITY < 5210, "ahead of Tailscale's rules") };
        for p in [0, 32766, 40000] {
            let e = err(&format!(r#"{{"version":1,"rule-priority":{p}}}"#));
            assert!(e.contains("rule-priority:"), "{e}");
        }
        let c = Config::parse(r#"{"version":1,"rule-priority":32765}"#, "t").unwrap();
        assert_eq!(c.rule_priority, 32765);
    }

    #[test]
    fn reserved_route_tables_are_refused() {
        for t in [0, 253, 254, 255] {
            let e = err(&format!(r#"{{"version":1,"route-table":{t}}}"#));
            assert!(e.contains("route-table:"), "{e}");
        }
        for t in [1, 252, 256, 300] {
            Config::parse(&format!(r#"{{"version":1,"route-table":{t}}}"#), "t").unwrap();
        }
    }

    #[test]
    fn bad_addresses_are_refused() {
        let e = err(r#"{"version":1,"bypass":["10.0.0.0/8","nope","1.2.3.4/33"]}"#);
        assert!(e.contains("bypass[1]") && e.contains("bypass[2]"), "{e}");
        assert!(!e.contains("bypass[0]"), "{e}");
        let e = err(
            r#"{"version":1,"tproxies":{"p":{"port":1,"mark":1,"dns-hijack":{"ip":"::1","ip6":"1.2.3.4"}}}}"#,
        );
        assert!(
            e.contains("tproxies.p.dns-hijack.ip:") && e.contains("tproxies.p.dns-hijack.ip6:"),
            "{e}"
        );
    }

    #[test]
    fn stub_hijack_needs_an_ipv4_address() {
        let e = err(
            r#"{"version":1,"tproxies":{"p":{"port":1,"mark":1,"dns-hijack":{"ip6":"::1","stub":true}}}}"#,
        );
        assert!(e.contains("tproxies.p.dns-hijack.stub: needs ip"), "{e}");
    }

    #[test]
    fn bypass_accepts_hosts_and_truncates_cidrs() {
        let c = Config::parse(
            r#"{"version":1,"bypass":["10.1.2.3","10.1.2.3/8","2001:db8::1"]}"#,
            "t",
        )
        .unwrap();
        let s: Vec<String> = c.bypass.iter().map(|n| n.to_string()).collect();
        assert_eq!(s, ["10.1.2.3/32", "10.0.0.0/8", "2001:db8::1/128"]);
    }

    #[test]
    fn upstreams_are_checked() {
        Config::parse(r#"{"version":1,"tproxies":{"p":{"port":1,"mark":1,"upstream":"socks5://127.0.0.1:1080"}}}"#, "t").unwrap();
        let e = err(r#"{"version":1,"tproxies":{"p":{"port":1,"mark":1,"upstream":"ftp://x:1"}}}"#);
        assert!(e.contains("tproxies.p.upstream:"), "{e}");
        let e =
            err(r#"{"version":1,"tproxies":{"p":{"port":1,"mark":1,"upstream-auth-file":"/x"}}}"#);
        assert!(e.contains("tproxies.p.upstream-auth-file"), "{e}");
    }

    #[test]
    fn bad_names_and_roots_are_refused() {
        let e = err(
            r#"{"version":1,"table":"a b","cgroup-root":"rel/path","tproxies":{"direct":{"port":1,"mark":1}}}"#,
        );
        assert!(
            e.contains("table:") && e.contains("cgroup-root:") && e.contains("tproxies.direct:"),
            "{e}"
        );
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let e = err(r#"{"version":3,"route-table":254,"rules":[{"match":"a"}]}"#);
        assert!(
            e.contains("version") && e.contains("route-table") && e.contains("rules[0]"),
            "{e}"
        );
    }
}
