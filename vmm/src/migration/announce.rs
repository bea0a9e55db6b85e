//! After a migration onto a new TAP (the classic path, no backend
//! transfer), the bridge still sends the guest's frames to the old port.
//! Like QEMU's announce-self, the target sends a few RARP frames from the
//! guest's MAC on the new TAP, so the bridge learns where the guest is.

use crate::devices::virtio::net::FrameIo;

/// RARP ethertype and the "request reverse" opcode (RFC 903).
const ETH_P_RARP: u16 = 0x8035;
const RARP_REQUEST_REVERSE: u16 = 3;
/// Frames sent per NIC (QEMU sends 5 by default, spaced; the bridge
/// learns from the first that arrives).
pub const ANNOUNCE_ROUNDS: usize = 3;

/// A broadcast RARP "request reverse" for `mac`, as QEMU builds it, behind
/// a zeroed virtio-net header of `vnet_hdr_len` bytes (no offload).
pub fn rarp_frame(mac: [u8; 6], vnet_hdr_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; vnet_hdr_len];
    f.extend_from_slice(&[0xff; 6]); // destination: broadcast
    f.extend_from_slice(&mac); // source: the guest
    f.extend_from_slice(&ETH_P_RARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.push(6); // hardware address length
    f.push(4); // protocol address length
    f.extend_from_slice(&RARP_REQUEST_REVERSE.to_be_bytes());
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    // Pad to the Ethernet minimum of 60 bytes (without FCS).
    f.resize(vnet_hdr_len + 60, 0);
    f
}

/// Sends the announcement for `mac` on `io`. Returns the frames written.
pub fn announce(io: &dyn FrameIo, mac: [u8; 6], vnet_hdr_len: usize) -> usize {
    let frame = rarp_frame(mac, vnet_hdr_len);
    let mut sent = 0;
    for _ in 0..ANNOUNCE_ROUNDS {
        match io.write_frame(&frame) {
            Ok(_) => sent += 1,
            Err(e) => log::warn!("announce: cannot write a RARP frame: {e}"),
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
        let f = rarp_frame(mac, 12);
        assert_eq!(f.len(), 72);
        assert!(f[..12].iter().all(|&b| b == 0));
        let eth = &f[12..];
        assert_eq!(&eth[..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &mac);
        assert_eq!(&eth[12..14], &[0x80, 0x35]);
        assert_eq!(&eth[20..22], &[0, 3]);
        assert_eq!(&eth[22..28], &mac);
        assert_eq!(&eth[32..38], &mac);
    }
}
