//! SNTP v4 client (RFC 4330, RFC 5905 on-wire protocol): one request, one validated
//! reply, the offset.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;

use super::{Sample, SourceError, Stopwatch};

/// The fixed NTP header; extension fields and a MAC may follow it.
const HEADER_LEN: usize = 48;
const VERSION: u8 = 4;
const MODE_CLIENT: u8 = 3;
const MODE_SERVER: u8 = 4;
const LEAP_UNSYNCHRONISED: u8 = 3;
/// Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01).
const NTP_UNIX_OFFSET: i128 = 2_208_988_800;
/// One second in 32.32 fixed point.
const ONE_SECOND: f64 = 4_294_967_296.0;

/// A 64-bit NTP timestamp: seconds since 1900 modulo 2^32 (the era is not on the wire)
/// in the high half, fraction of a second in the low half.
pub(super) type Timestamp = u64;

/// Why a reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SntpError {
    #[error("{0} bytes, shorter than the {len}-byte NTP header", len = HEADER_LEN)]
    Short(usize),
    #[error("mode {0}, expected 4 (server)")]
    Mode(u8),
    #[error("originate timestamp {got:#018x} does not echo our transmit timestamp {sent:#018x}")]
    OriginateMismatch { sent: Timestamp, got: Timestamp },
    #[error("kiss-o'-death from the server, code {0:?}")]
    KissOfDeath(String),
    #[error("stratum {0} (16 and above mean unsynchronised)")]
    Stratum(u8),
    #[error("leap indicator 3: the server's clock is not synchronised")]
    Unsynchronised,
    #[error("zero {0} timestamp")]
    ZeroTimestamp(&'static str),
}

pub(super) fn to_timestamp(time: SystemTime) -> Timestamp {
    let unix_nanos = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i128,
        Err(before) => -(before.duration().as_nanos() as i128),
    };
    let ntp_nanos = unix_nanos + NTP_UNIX_OFFSET * 1_000_000_000;
    // Truncating to 64 bits keeps the seconds modulo 2^32, exactly what goes on the wire.
    ((ntp_nanos << 32) / 1_000_000_000) as Timestamp
}

/// `a - b` in 32.32 fixed point. Wrapping subtraction makes this right across an era
/// boundary (2036) as long as the true difference is under 68 years (RFC 5905 section 6).
fn diff(a: Timestamp, b: Timestamp) -> i128 {
    i128::from(a.wrapping_sub(b) as i64)
}

/// RFC 5905 on-wire calculation from T1 (client send), T2 (server receive), T3 (server
/// send), T4 (client receive). Returns `(theta, delta)` in seconds: theta is reference
/// minus local, exact when the two legs take equally long; delta is the round trip
/// without the server's processing time.
pub(super) fn offset_and_delay(
    t1: Timestamp,
    t2: Timestamp,
    t3: Timestamp,
    t4: Timestamp,
) -> (f64, f64) {
    let theta = (diff(t2, t1) + diff(t3, t4)) as f64 / 2.0 / ONE_SECOND;
    let delta = (diff(t4, t1) - diff(t3, t2)) as f64 / ONE_SECOND;
    (theta, delta)
}

/// A client request: version 4, mode 3, everything zero but the transmit timestamp,
/// which the server echoes as the originate timestamp.
pub(super) fn encode_request(transmit: Timestamp) -> [u8; HEADER_LEN] {
    let mut packet = [0; HEADER_LEN];
    packet[0] = (VERSION << 3) | MODE_CLIENT;
    packet[40..48].copy_from_slice(&transmit.to_be_bytes());
    packet
}

/// The fields of a validated server reply that the offset needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reply {
    pub stratum: u8,
    pub receive: Timestamp,
    pub transmit: Timestamp,
}

/// Validates a reply to the request whose transmit timestamp was `sent`.
pub(super) fn decode_reply(packet: &[u8], sent: Timestamp) -> Result<Reply, SntpError> {
    if packet.len() < HEADER_LEN {
        return Err(SntpError::Short(packet.len()));
    }
    let timestamp =
        |at: usize| Timestamp::from_be_bytes(packet[at..at + 8].try_into().expect("8 bytes"));
    let (leap, mode, stratum) = (packet[0] >> 6, packet[0] & 0b111, packet[1]);
    if mode != MODE_SERVER {
        return Err(SntpError::Mode(mode));
    }
    // Before believing anything else: a reply that does not echo our timestamp answers
    // someone else's request, or is forged.
    let originate = timestamp(24);
    if originate != sent {
        return Err(SntpError::OriginateMismatch {
            sent,
            got: originate,
        });
    }
    // Stratum 0 first: a kiss-o'-death also carries leap indicator 3, and its code
    // (RATE, DENY, ...) is what tells the operator what went wrong.
    if stratum == 0 {
        return Err(SntpError::KissOfDeath(kiss_code(&packet[12..16])));
    }
    if stratum > 15 {
        return Err(SntpError::Stratum(stratum));
    }
    if leap == LEAP_UNSYNCHRONISED {
        return Err(SntpError::Unsynchronised);
    }
    let (receive, transmit) = (timestamp(32), timestamp(40));
    if receive == 0 {
        return Err(SntpError::ZeroTimestamp("receive"));
    }
    if transmit == 0 {
        return Err(SntpError::ZeroTimestamp("transmit"));
    }
    Ok(Reply {
        stratum,
        receive,
        transmit,
    })
}

/// The reference ID of a kiss-o'-death: four ASCII characters, NUL-padded.
fn kiss_code(reference_id: &[u8]) -> String {
    let end = reference_id
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(reference_id.len());
    reference_id[..end].escape_ascii().to_string()
}

/// One SNTP exchange with `host:port`. Unbounded on its own: the caller applies the timeout.
pub(super) async fn query(host: &str, port: u16) -> Result<Sample, SourceError> {
    let addr = tokio::net::lookup_host((host, port))
        .await
        .map_err(|error| SourceError::Resolve {
            host: host.to_owned(),
            error,
        })?
        .next()
        .ok_or_else(|| SourceError::NoAddress {
            host: host.to_owned(),
        })?;
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let io = |error| SourceError::Io { addr, error };
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    // Connected: the kernel drops datagrams from anyone else, and an ICMP "port
    // unreachable" becomes an immediate error instead of a wait for the timeout.
    socket.connect(addr).await.map_err(io)?;

    let clock = Stopwatch::start();
    let t1 = to_timestamp(clock.wall);
    socket.send(&encode_request(t1)).await.map_err(io)?;
    let mut buf = [0; 1024];
    let len = socket.recv(&mut buf).await.map_err(io)?;
    let (received, _) = clock.stop();
    let t4 = to_timestamp(received);

    let reply = decode_reply(&buf[..len], t1)?;
    let (theta, delta) = offset_and_delay(t1, reply.receive, reply.transmit, t4);
    Ok(Sample {
        offset: -theta,
        // Negative only if the server claims to have spent longer than the whole round trip.
        round_trip: Duration::try_from_secs_f64(delta).unwrap_or(Duration::ZERO),
        stratum: Some(reply.stratum),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2023-08-01T00:00:00Z in NTP seconds, a base for hand-computed timestamps.
    const BASE: u64 = 3_899_836_800;

    /// `BASE + ms` milliseconds as an NTP timestamp.
    fn at_ms(ms: i64) -> Timestamp {
        let nanos = (BASE as i128 * 1_000_000_000) + ms as i128 * 1_000_000;
        ((nanos << 32) / 1_000_000_000) as Timestamp
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-6
    }

    #[test]
    fn converts_system_time_to_ntp_era_timestamps() {
        assert_eq!(to_timestamp(UNIX_EPOCH), 2_208_988_800 << 32);
        assert_eq!(
            to_timestamp(UNIX_EPOCH + Duration::from_millis(500)),
            (2_208_988_800 << 32) | 0x8000_0000
        );
        let base = UNIX_EPOCH + Duration::from_secs(BASE - 2_208_988_800);
        assert_eq!(to_timestamp(base), BASE << 32);
        // 2036-02-07T06:28:16Z starts era 1: the seconds field wraps to zero.
        let era1 = UNIX_EPOCH + Duration::from_secs((1 << 32) - 2_208_988_800);
        assert_eq!(to_timestamp(era1), 0);
        assert_eq!(to_timestamp(era1 + Duration::from_secs(3)), 3 << 32);
    }

    #[test]
    fn offset_with_symmetric_round_trip() {
        // Reference 4 s ahead, 60 ms each way, 10 ms of server processing.
        let (t1, t4) = (at_ms(0), at_ms(130));
        let (t2, t3) = (at_ms(4_060), at_ms(4_070));
        let (theta, delta) = offset_and_delay(t1, t2, t3, t4);
        assert!(close(theta, 4.0), "{theta}");
        assert!(close(delta, 0.120), "{delta}");
    }

    #[test]
    fn offset_with_asymmetric_round_trip() {
        // Reference 4 s ahead; 10 ms out, 90 ms back, 1 ms processing. The formula assumes
        // equal legs, so it is off by half the asymmetry: (0.010 - 0.090) / 2 = -0.040.
        let (t1, t2, t3, t4) = (at_ms(0), at_ms(4_010), at_ms(4_011), at_ms(101));
        let (theta, delta) = offset_and_delay(t1, t2, t3, t4);
        assert!(close(theta, 3.960), "{theta}");
        assert!(close(delta, 0.100), "{delta}");
    }

    #[test]
    fn offset_with_reference_behind() {
        // Reference 7 s behind (local is ahead: local minus reference = +7).
        let (t1, t2, t3, t4) = (at_ms(10_000), at_ms(3_020), at_ms(3_025), at_ms(10_045));
        let (theta, delta) = offset_and_delay(t1, t2, t3, t4);
        assert!(close(theta, -7.0), "{theta}");
        assert!(close(delta, 0.040), "{delta}");
    }

    #[test]
    fn offset_across_the_era_boundary() {
        // Local clock 2 s before the 2036 rollover, reference 4 s ahead (already in era 1).
        let t1 = 0xFFFF_FFFE_0000_0000;
        let t2 = (2 << 32) | 0x0200_0000; // +4 s, +~7.8 ms
        let t3 = t2 + 0x0100_0000; // +~3.9 ms
        let t4 = 0xFFFF_FFFE_0000_0000 + 0x0400_0000; // +~15.6 ms
        let (theta, delta) = offset_and_delay(t1, t2, t3, t4);
        let leg = 0x0200_0000 as f64 / ONE_SECOND;
        assert!(
            close(theta, ((4.0 + leg) + (4.0 + 1.5 * leg - 2.0 * leg)) / 2.0),
            "{theta}"
        );
        assert!(close(delta, 1.5 * leg), "{delta}");
    }

    #[test]
    fn request_is_version_4_client_mode_with_transmit_set() {
        let packet = encode_request(0x0123_4567_89ab_cdef);
        assert_eq!(packet.len(), 48);
        assert_eq!(packet[0], 0b00_100_011);
        assert!(packet[1..40].iter().all(|&b| b == 0));
        assert_eq!(
            packet[40..48],
            [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]
        );
    }

    const SENT: Timestamp = 0xE8A1_0000_1234_5678;

    fn reply() -> Vec<u8> {
        let mut packet = vec![0; 48];
        packet[0] = 0b00_100_100; // LI 0, version 4, mode 4
        packet[1] = 2;
        packet[12..16].copy_from_slice(b"GPS\0");
        packet[24..32].copy_from_slice(&SENT.to_be_bytes());
        packet[32..40].copy_from_slice(&(SENT + 100).to_be_bytes());
        packet[40..48].copy_from_slice(&(SENT + 200).to_be_bytes());
        packet
    }

    #[test]
    fn accepts_a_valid_reply_with_or_without_trailing_fields() {
        let expected = Reply {
            stratum: 2,
            receive: SENT + 100,
            transmit: SENT + 200,
        };
        assert_eq!(decode_reply(&reply(), SENT), Ok(expected));
        let mut with_mac = reply();
        with_mac.extend_from_slice(&[0xAA; 20]);
        assert_eq!(decode_reply(&with_mac, SENT), Ok(expected));
    }

    #[test]
    fn rejects_invalid_replies() {
        let mutated = |change: fn(&mut Vec<u8>)| {
            let mut packet = reply();
            change(&mut packet);
            decode_reply(&packet, SENT).unwrap_err()
        };
        assert_eq!(mutated(|p| p.truncate(47)), SntpError::Short(47));
        assert_eq!(mutated(|p| p[0] = 0b00_100_011), SntpError::Mode(3));
        assert_eq!(mutated(|p| p[0] = 0b00_100_101), SntpError::Mode(5));
        assert_eq!(
            mutated(|p| p[31] ^= 1),
            SntpError::OriginateMismatch {
                sent: SENT,
                got: SENT ^ 1
            }
        );
        assert_eq!(mutated(|p| p[1] = 16), SntpError::Stratum(16));
        assert_eq!(mutated(|p| p[0] |= 0b11_000_000), SntpError::Unsynchronised);
        assert_eq!(
            mutated(|p| p[32..40].fill(0)),
            SntpError::ZeroTimestamp("receive")
        );
        assert_eq!(
            mutated(|p| p[40..48].fill(0)),
            SntpError::ZeroTimestamp("transmit")
        );
    }

    #[test]
    fn kiss_of_death_is_refused_with_its_code() {
        let mut packet = reply();
        packet[0] = 0b11_100_100; // a kiss-o'-death also says "unsynchronised"
        packet[1] = 0;
        packet[12..16].copy_from_slice(b"RATE");
        assert_eq!(
            decode_reply(&packet, SENT),
            Err(SntpError::KissOfDeath("RATE".into()))
        );
        packet[12..16].copy_from_slice(b"X\x01\0\0");
        assert_eq!(
            decode_reply(&packet, SENT),
            Err(SntpError::KissOfDeath("X\\x01".into()))
        );
        // An unechoed kiss is someone else's (or forged): not believed.
        packet[24] ^= 1;
        assert!(matches!(
            decode_reply(&packet, SENT),
            Err(SntpError::OriginateMismatch { .. })
        ));
    }
}
