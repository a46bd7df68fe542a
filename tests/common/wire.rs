//! A Produce request written by hand, for what no Kafka client sends: a
//! record batch that cannot be decoded. Only the fields the request needs
//! (Produce v3, record batch v2) are written.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// CRC-32C (Castagnoli), which a v2 record batch carries.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A v2 record batch of `records` records, well framed and with a correct
/// CRC, whose attributes say gzip but whose data is not gzip.
pub fn corrupt_gzip_batch(records: i32) -> Vec<u8> {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283, "CRC-32C's check value");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut checked = Vec::new();
    checked.extend(1i16.to_be_bytes()); // attributes: gzip
    checked.extend((records - 1).to_be_bytes()); // last offset delta
    checked.extend(now_ms.to_be_bytes()); // base timestamp
    checked.extend(now_ms.to_be_bytes()); // max timestamp
    checked.extend((-1i64).to_be_bytes()); // producer id: none
    checked.extend((-1i16).to_be_bytes()); // producer epoch
    checked.extend((-1i32).to_be_bytes()); // base sequence
    checked.extend(records.to_be_bytes());
    checked.extend(b"these bytes are not gzip, whatever the attributes say");
    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // base offset: the broker assigns it
                                      // Length after this field: leader epoch, magic, CRC, the checked part.
    batch.extend(((4 + 1 + 4 + checked.len()) as i32).to_be_bytes());
    batch.extend((-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend(crc32c(&checked).to_be_bytes());
    batch.extend(checked);
    batch
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as i16).to_be_bytes());
    out.extend(s.as_bytes());
}

/// Writes `batch` to `topic`'s `partition` through the broker at
/// `address` (which must lead it) with acks=all; returns the offset the
/// broker gave the batch, or panics with its error code.
pub fn produce_batch(address: &str, topic: &str, partition: i32, batch: &[u8]) -> i64 {
    let mut request = Vec::new();
    request.extend(0i16.to_be_bytes()); // api key: Produce
    request.extend(3i16.to_be_bytes()); // api version
    request.extend(7i32.to_be_bytes()); // correlation id
    string(&mut request, "weatherstream-tests");
    request.extend((-1i16).to_be_bytes()); // transactional id: none
    request.extend((-1i16).to_be_bytes()); // acks: all
    request.extend(10_000i32.to_be_bytes()); // timeout ms
    request.extend(1i32.to_be_bytes()); // one topic
    string(&mut request, topic);
    request.extend(1i32.to_be_bytes()); // one partition
    request.extend(partition.to_be_bytes());
    request.extend((batch.len() as i32).to_be_bytes());
    request.extend(batch);

    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(&(request.len() as i32).to_be_bytes())
        .unwrap();
    stream.write_all(&request).unwrap();
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).unwrap();
    let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut response).unwrap();

    let mut at = 0;
    let mut take = |n: usize| {
        let field = response[at..at + n].to_vec();
        at += n;
        field
    };
    assert_eq!(take(4), 7i32.to_be_bytes(), "correlation id");
    assert_eq!(take(4), 1i32.to_be_bytes(), "topics in the response");
    let name_len = i16::from_be_bytes(take(2).try_into().unwrap()) as usize;
    assert_eq!(take(name_len), topic.as_bytes());
    assert_eq!(take(4), 1i32.to_be_bytes(), "partitions in the response");
    assert_eq!(take(4), partition.to_be_bytes());
    let error_code = i16::from_be_bytes(take(2).try_into().unwrap());
    assert_eq!(error_code, 0, "the broker refused the batch");
    i64::from_be_bytes(take(8).try_into().unwrap())
}
