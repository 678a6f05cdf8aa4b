//! Walking netlink messages and attributes in received bytes, and one
//! request/reply exchange with the kernel. Every read is bounds-checked: a
//! truncated or malformed datagram ends the walk, never panics.

use netlink_sys::{Socket, SocketAddr};

use crate::kernel::consts::{NLMSG_DONE, NLMSG_ERROR};

/// One netlink message of a datagram.
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// The sender's port id (for notifications: who caused them).
    pub pid: u32,
    /// The whole message, header included.
    pub bytes: &'a [u8],
}

impl<'a> Msg<'a> {
    /// What follows the 16-byte header.
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[16..]
    }
}

/// The messages of a datagram.
pub fn messages(mut b: &[u8]) -> Vec<Msg<'_>> {
    let mut out = Vec::new();
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < 16 || len > b.len() {
            break;
        }
        out.push(Msg {
            ty: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            pid: u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            bytes: &b[..len],
        });
        b = b.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    out
}

/// Attributes: (type without the nested/byte-order flags, payload).
pub fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((u16::from_ne_bytes([b[2], b[3]]) & 0x3fff, &b[4..len]));
        b = b.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    out
}

/// The first attribute of type `ty`.
pub fn attr(b: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(b).into_iter().find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// A request: the 16-byte header (sender port 0: the kernel fills it in) and `body`.
pub fn encode(ty: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = 16 + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    out
}

/// One attribute: header, `value` (itself attributes, for a nested one) and
/// the padding to 4 bytes.
pub fn encode_attr(ty: u16, value: &[u8]) -> Vec<u8> {
    let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
    a.extend(ty.to_ne_bytes());
    a.extend(value);
    a.resize(a.len().div_ceil(4) * 4, 0);
    a
}

/// The errno of an `NLMSG_ERROR` message's payload (0 for an ack), if complete.
pub fn error_code(payload: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

/// A netlink socket connected to the kernel, for requests and their replies.
pub struct Channel {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Channel {
    /// Opens a socket of netlink `protocol`; replies are read `buf_len` bytes at
    /// a time (a dump datagram is at most 32 KiB).
    pub fn open(protocol: isize, buf_len: usize) -> std::io::Result<Channel> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Channel {
            sock,
            seq: 0,
            buf: vec![0; buf_len],
        })
    }

    /// Sends the request `build(seq)` makes for a fresh sequence number and hands
    /// each reply with that number to `f`, until the kernel's ack or error, or the
    /// end of a dump. Returns the errno of the final message (0: ack or end of
    /// dump, negative: error), or `None` for an error message cut short.
    pub fn exchange(
        &mut self,
        build: impl FnOnce(u32) -> Vec<u8>,
        mut f: impl FnMut(Msg<'_>),
    ) -> std::io::Result<Option<i32>> {
        self.seq += 1;
        self.sock.send(&build(self.seq), 0)?;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for m in messages(self.buf.get(..n).unwrap_or(&[])) {
                if m.seq != self.seq {
                    continue;
                }
                match m.ty {
                    NLMSG_ERROR => return Ok(error_code(m.payload())),
                    NLMSG_DONE => return Ok(Some(0)),
                    _ => f(m),
                }
            }
        }
    }
}

/// A string attribute without its terminating NUL.
pub fn c_str(b: &[u8]) -> &[u8] {
    b.split(|&c| c == 0).next().unwrap_or(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_input_ends_the_walk() {
        assert!(attrs(&[8, 0, 1, 0, 1]).is_empty());
        assert_eq!(attrs(&[5, 0, 1, 0, 1]).len(), 1, "unpadded last attribute");
        let mut m = 20u32.to_ne_bytes().to_vec();
        m.extend([0; 16]);
        assert_eq!(messages(&m).len(), 1, "unpadded last message");
        assert!(messages(&m[..18]).is_empty());
        assert_eq!(c_str(b"abc\0\0"), b"abc");
    }

    #[test]
    fn an_encoded_request_walks_back() {
        let m = encode(34, 0x301, 7, &[1, 2, 3, 4]);
        assert_eq!(m.len(), 20);
        let [msg] = messages(&m)[..] else {
            panic!("one message expected");
        };
        assert_eq!((msg.ty, msg.flags, msg.seq, msg.pid), (34, 0x301, 7, 0));
        assert_eq!(msg.payload(), [1, 2, 3, 4]);
        assert_eq!(error_code(&(-17i32).to_ne_bytes()), Some(-17));
        assert_eq!(error_code(&[0, 0]), None);
    }
}
