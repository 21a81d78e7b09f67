//! Internet checksum (RFC 1071) over small fixed headers.

/// Ones'-complement sum folded to 16 bits and inverted. Over a header whose checksum field
/// is zero it gives the checksum to store; over a header with a valid checksum it gives 0.
pub fn ipv4_header_checksum(h: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
        i += 2;
    }
    fold(sum)
}

/// `acc` plus the big-endian 16-bit words of `data` (even length), unfolded: the running sum
/// of RFC 1071. Over headers of a few dozen bytes it cannot overflow. A fixed-size array, so
/// the eBPF build unrolls it into loads from where the bytes are, without copies.
#[inline(always)]
pub fn add_words<const N: usize>(mut acc: u32, data: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        acc += u16::from_be_bytes([data[i], data[i + 1]]) as u32;
        i += 2;
    }
    acc
}

/// The IPv6 pseudo-header (RFC 8200 section 8.1) added to `acc`.
#[inline(always)]
pub fn add_ipv6_pseudo_header(acc: u32, src: &[u8; 16], dst: &[u8; 16], upper_len: u32, next_header: u8) -> u32 {
    let acc = add_words(add_words(acc, src), dst);
    acc + (upper_len >> 16) + (upper_len & 0xffff) + next_header as u32
}

/// The ones'-complement sum folded to 16 bits, not inverted.
pub const fn fold_sum(sum: u32) -> u16 {
    !fold(sum)
}

pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The IPv4 header checksum after the TTL went down by one, from the one before (RFC 1624
/// incremental update, as the kernel's ip_decrease_ttl): the TTL is the high byte of its
/// 16-bit word, so the sum drops by 0x0100 and the checksum rises by as much.
pub const fn ttl_decrement_checksum(check: u16) -> u16 {
    let sum = check as u32 + 0x0100;
    (sum + (sum >> 16)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_header_and_words_sum_as_rfc_1071() {
        // A UDP datagram over IPv6, summed the slow way: pseudo-header bytes then the segment.
        let src = [0xfd, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2];
        let dst = [0xfd, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3];
        let segment = [0x9c, 0x40, 0x21, 0x18, 0x00, 0x0c, 0x00, 0x00, 0xde, 0xad, 0xbe, 0xef];
        let mut flat = [0u8; 52];
        flat[..16].copy_from_slice(&src);
        flat[16..32].copy_from_slice(&dst);
        flat[32..36].copy_from_slice(&12u32.to_be_bytes());
        flat[36..40].copy_from_slice(&[0, 0, 0, 17]);
        flat[40..].copy_from_slice(&segment);
        let slow = fold(add_words(0, &flat));
        let fast = fold(add_words(add_ipv6_pseudo_header(0, &src, &dst, 12, 17), &segment));
        assert_eq!(slow, fast);
        assert_eq!(fold_sum(0x1_fffe), 0xffff);
    }

    #[test]
    fn known_header_checksum() {
        // Example from RFC 1071 discussions / Wikipedia's IPv4 header checksum article.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
        h[10] = 0xb8;
        h[11] = 0x61;
        assert_eq!(ipv4_header_checksum(&h), 0);
    }

    #[test]
    fn ttl_decrement_matches_a_full_recomputation() {
        // Checksums near the wrap-around included (0xff00 and up carry into the low byte).
        for (ttl, ident) in [(64u8, 0u16), (2, 0x1234), (255, 0xffff), (3, 0xfeff), (100, 0x00ff)] {
            for src_low in [0u8, 1, 0x7f, 0xfe, 0xff] {
                let mut h = [
                    0x45, 0, 0, 84, 0, 0, 0x40, 0, ttl, 1, 0, 0, 10, 244, 1, src_low, 10, 244, 2, 3,
                ];
                h[4..6].copy_from_slice(&ident.to_be_bytes());
                let check = ipv4_header_checksum(&h);
                h[10..12].copy_from_slice(&check.to_be_bytes());
                h[8] -= 1;
                let updated = ttl_decrement_checksum(check);
                h[10..12].copy_from_slice(&updated.to_be_bytes());
                assert_eq!(ipv4_header_checksum(&h), 0, "ttl {ttl} ident {ident:#x} src {src_low}");
            }
        }
    }
}
