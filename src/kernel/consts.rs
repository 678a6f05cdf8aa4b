//! Netlink numbers the kernel crates we use do not export, in one place
//! (linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h,
//! linux/rtnetlink.h).

// Message types and flags common to every netlink family.
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
/// `NLM_F_ROOT | NLM_F_MATCH`.
pub const NLM_F_DUMP: u16 = 0x300;
/// An error reply carries extended-ack attributes.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
/// The extended ack's human-readable message.
pub const NLMSGERR_ATTR_MSG: u16 = 1;

/// `NFNL_SUBSYS_NFTABLES`, the high byte of nftables message types.
pub const SUBSYS_NFTABLES: u16 = 10;
/// `NFNLGRP_NFTABLES`, the nftables notification group.
pub const NFNLGRP_NFTABLES: u32 = 7;

// nftables message types (`NFT_MSG_*`).
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_DELCHAIN: u16 = 5;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_DELRULE: u16 = 8;
pub const NFT_MSG_GETSET: u16 = 10;
pub const NFT_MSG_DELSET: u16 = 11;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_GETSETELEM: u16 = 13;
pub const NFT_MSG_DELSETELEM: u16 = 14;
pub const NFT_MSG_NEWGEN: u16 = 15;
pub const NFT_MSG_GETOBJ: u16 = 19;
pub const NFT_MSG_DELOBJ: u16 = 20;

// rtnetlink message types: rules and routes are parsed and emitted one kind
// at a time, not through netlink-packet-route's all-families message enum,
// so that its parsers of links, qdiscs and neighbours stay out of the binary.
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_DELROUTE: u16 = 25;
pub const RTM_GETROUTE: u16 = 26;
pub const RTM_NEWRULE: u16 = 32;
pub const RTM_DELRULE: u16 = 33;
pub const RTM_GETRULE: u16 = 34;

// rtnetlink notification groups (`RTNLGRP_*`).
pub const RTNLGRP_IPV4_ROUTE: u32 = 7;
pub const RTNLGRP_IPV4_RULE: u32 = 8;
pub const RTNLGRP_IPV6_ROUTE: u32 = 11;
pub const RTNLGRP_IPV6_RULE: u32 = 19;

/// sock_diag's request type.
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;

// rtnetlink links and network-namespace ids.
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWNSID: u16 = 88;
pub const RTM_GETNSID: u16 = 90;
/// `RTNLGRP_LINK`: links appearing, changing, going.
pub const RTNLGRP_LINK: u32 = 1;
/// `IFLA_IFNAME`, `IFLA_MASTER`, `IFLA_LINK_NETNSID`.
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MASTER: u16 = 10;
pub const IFLA_LINK_NETNSID: u16 = 37;
/// `NETNSA_NSID` (reply) and `NETNSA_PID` (request).
pub const NETNSA_NSID: u16 = 1;
pub const NETNSA_PID: u16 = 2;
