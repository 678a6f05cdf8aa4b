//! Everything that talks to the kernel over netlink: nftables transactions and
//! dumps, policy routing, change notifications, socket diagnostics.

pub mod bpf;
pub mod consts;
pub mod events;
pub mod inspect;
pub mod links;
pub mod nft;
pub mod nlmsg;
pub mod route;
pub mod sockdiag;
