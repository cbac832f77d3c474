//! AMD SEV-SNP evidence from configfs-tsm (`provider` = `sev_guest`), in the form the
//! Trustee verifier reads: guest-components' `SnpEvidence {attestation_report,
//! cert_chain}`, the serde form of the `sev` crate's parsed report and certificate table.
//!
//! Built with the `sev` crate itself (6.3, what the CoCo attestation agent builds it with;
//! trustee's verifier reads it with sev 7), so the JSON is the attester's by construction:
//! a hand-written serialization of ~30 nested fields would fail at the verifier with no
//! clear reason. Sources read: guest-components 8246e5e0 `attestation-agent/attester/src/
//! snp/mod.rs` (`AttestationReport::from_bytes` of the raw report, the cert table sorted,
//! `None` when the host gives no certificates) and its configfs-tsm pull request #1676
//! (`outblob` = the report, `auxblob` = the table); trustee 78962cd4 `deps/verifier/src/
//! snp/mod.rs` (report version 3 to 5, VMPL 0, all 64 bytes of REPORT_DATA compared with
//! the 48-byte hash zero-padded; a `Some` chain must hold a VCEK or VLEK); Linux
//! `Documentation/ABI/testing/configfs-tsm-report` and `drivers/virt/coco/sev-guest`.
//!
//! Everything here is the kernel's (the host's, in the threat model) bytes: the report is
//! checked for its length, VMPL and our report data before it is parsed, and the table is
//! parsed here with every offset bounded (the `sev` crate's own table parser follows the
//! host's offsets unchecked).

use sev::firmware::guest::AttestationReport;
use sev::firmware::host::CertTableEntry;

/// An SEV-SNP attestation report (versions 2 to 5) is 1184 bytes.
pub(crate) const REPORT_LEN: usize = 1184;
/// Where the report's fields are (SEV-SNP ABI, ATTESTATION_REPORT).
const VMPL_AT: usize = 0x30;
const REPORT_DATA_AT: usize = 0x50;
/// `auxblob`: the table and the certificates (VCEK, ASK, ARK: under 2 KiB each).
pub(super) const AUXBLOB_MAX: usize = 64 << 10;
/// One table entry: a 16-byte GUID, a u32 offset, a u32 length (GHCB spec); a zero GUID
/// ends the table.
const ENTRY_LEN: usize = 24;
/// More entries than any host gives (5 GUIDs are defined).
const MAX_ENTRIES: usize = 16;

/// What goes in `tee-evidence.primary_evidence` for `tee` = `snp` (guest-components'
/// struct, same field names, no serde attributes).
#[derive(serde::Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub(super) struct SnpEvidence {
    pub attestation_report: AttestationReport,
    pub cert_chain: Option<Vec<CertTableEntry>>,
}

/// The REPORT_DATA of a raw report, after its length and VMPL are checked.
pub(crate) fn report_data(report: &[u8]) -> Result<&[u8], String> {
    if report.len() != REPORT_LEN {
        return Err(format!(
            "outblob is {} bytes; an SEV-SNP attestation report is {REPORT_LEN}",
            report.len()
        ));
    }
    let vmpl = u32::from_le_bytes(
        report[VMPL_AT..VMPL_AT + 4]
            .try_into()
            .expect("4 bytes inside a checked length"),
    );
    // The verifier refuses any other; say so here rather than as a KBS refusal.
    if vmpl != 0 {
        return Err(format!(
            "the SEV-SNP report is for VMPL {vmpl}; the KBS verifier accepts VMPL 0 only"
        ));
    }
    Ok(&report[REPORT_DATA_AT..REPORT_DATA_AT + 64])
}

/// The evidence JSON of a raw report (already checked by [`report_data`]) and `auxblob`
/// (absent or empty: no certificates, so the verifier fetches the VCEK itself).
pub(crate) fn evidence(report: &[u8], aux: Option<&[u8]>) -> Result<serde_json::Value, String> {
    let attestation_report = AttestationReport::from_bytes(report)
        .map_err(|e| format!("the sev crate cannot read the SEV-SNP report: {e}"))?;
    let cert_chain = match aux {
        Some(a) if !a.is_empty() => Some(cert_table(a)?),
        _ => None,
    };
    serde_json::to_value(SnpEvidence {
        attestation_report,
        cert_chain,
    })
    .map_err(|e| format!("SEV-SNP evidence: {}", super::json_error(&e)))
}

/// The GHCB extended-report certificate table: entries until an all-zero one, each naming
/// a range of the blob by offset from its start. Sorted as the attestation agent sorts it.
pub(crate) fn cert_table(aux: &[u8]) -> Result<Vec<CertTableEntry>, String> {
    let mut out = Vec::new();
    for i in 0..=MAX_ENTRIES {
        let at = i * ENTRY_LEN;
        let Some(e) = aux.get(at..at + ENTRY_LEN) else {
            return Err("auxblob: the certificate table has no terminating entry".into());
        };
        // The end: an all-zero GUID (the kernel writes an all-zero entry; the attestation
        // agent's parser, sev's `parse_table`, stops at the GUID alone).
        if e[..16].iter().all(|b| *b == 0) {
            out.sort();
            return Ok(out);
        }
        if i == MAX_ENTRIES {
            return Err(format!(
                "auxblob: more than {MAX_ENTRIES} certificate table entries"
            ));
        }
        let word = |r: std::ops::Range<usize>| {
            u32::from_le_bytes(e[r].try_into().expect("4 bytes of a 24-byte entry")) as usize
        };
        let (off, len) = (word(16..20), word(20..24));
        let data = off
            .checked_add(len)
            .and_then(|end| aux.get(off..end))
            .ok_or_else(|| {
                format!("auxblob: certificate {i} ({len} bytes at {off}) is past the blob's end")
            })?;
        let guid = uuid::Uuid::from_bytes(e[..16].try_into().expect("16 bytes of a 24-byte entry"));
        let entry = CertTableEntry::from_guid(&guid, data.to_vec())
            .map_err(|e| format!("auxblob: certificate {i}: {e}"))?;
        out.push(entry);
    }
    unreachable!("the loop returns at an all-zero entry or past MAX_ENTRIES")
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use sev::firmware::host::CertType;

    /// A version-3 Genoa report (the sev crate's own writer) carrying `report_data`.
    pub fn report(report_data: &[u8; 64], vmpl: u32) -> Vec<u8> {
        let r = AttestationReport {
            version: 3,
            guest_svn: 7,
            vmpl,
            sig_algo: 1,
            cpuid_fam_id: Some(0x19),
            cpuid_mod_id: Some(0x11),
            cpuid_step: Some(1),
            report_data: report_data.to_vec().try_into().unwrap(),
            measurement: vec![0xab; 48].try_into().unwrap(),
            chip_id: vec![0xc1; 64].try_into().unwrap(),
            ..AttestationReport::default()
        };
        let mut out = Vec::new();
        r.write_bytes(&mut out).unwrap();
        assert_eq!(out.len(), REPORT_LEN);
        out
    }

    pub const VCEK: &str = "63da758d-e664-4564-adc5-f4b93be8accd";
    pub const ASK: &str = "4ab7b379-bbac-4fe4-a02f-05aef327c782";
    pub const ARK: &str = "c0b406a4-a803-4952-9743-3fb6014cd0ae";

    /// A certificate table of `(guid, data)` as the kernel gives it in `auxblob`.
    pub fn table(certs: &[(&str, &[u8])]) -> Vec<u8> {
        let head = (certs.len() + 1) * ENTRY_LEN;
        let mut t = vec![0u8; head];
        for (i, (guid, data)) in certs.iter().enumerate() {
            let at = i * ENTRY_LEN;
            let off = t.len() as u32;
            t[at..at + 16].copy_from_slice(uuid::Uuid::parse_str(guid).unwrap().as_bytes());
            t[at + 16..at + 20].copy_from_slice(&off.to_le_bytes());
            t[at + 20..at + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
            t.extend_from_slice(data);
        }
        t
    }

    #[test]
    fn the_table_is_read_as_the_attestation_agent_reads_it() {
        let t = table(&[(ARK, b"ark-der"), (VCEK, b"vcek-der"), (ASK, b"ask")]);
        let got = cert_table(&t).unwrap();
        let types: Vec<_> = got
            .iter()
            .map(|c| (c.cert_type.clone(), c.data.clone()))
            .collect();
        assert_eq!(
            types,
            // The sev crate's order (its `Ord` puts ARK first).
            vec![
                (CertType::ARK, b"ark-der".to_vec()),
                (CertType::VCEK, b"vcek-der".to_vec()),
                (CertType::ASK, b"ask".to_vec()),
            ]
        );
        // The sev crate's own (unchecked) parser agrees on a well-formed table.
        let mut copy = t.clone();
        let mut theirs = CertTableEntry::vec_bytes_to_cert_table(&mut copy).unwrap();
        theirs.sort();
        assert_eq!(got, theirs);
    }

    #[test]
    fn a_hostile_table_is_refused() {
        let good = table(&[(VCEK, b"vcek-der")]);
        // The entry's length runs past the blob.
        let mut long = good.clone();
        long[20..24].copy_from_slice(&1000u32.to_le_bytes());
        assert!(cert_table(&long)
            .unwrap_err()
            .contains("past the blob's end"));
        // An offset that overflows when the length is added.
        let mut wrap = good.clone();
        wrap[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        wrap[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(cert_table(&wrap)
            .unwrap_err()
            .contains("past the blob's end"));
        // No terminating entry: the blob ends inside the table (the one certificate's
        // bytes sit where the next entry would start).
        let mut open = good[..ENTRY_LEN].to_vec();
        open[16..20].copy_from_slice(&(ENTRY_LEN as u32).to_le_bytes());
        open[20..24].copy_from_slice(&4u32.to_le_bytes());
        open.extend_from_slice(b"vcek");
        assert!(cert_table(&open)
            .unwrap_err()
            .contains("no terminating entry"));
        // Endless entries (each pointing at itself).
        let mut many = Vec::new();
        for _ in 0..MAX_ENTRIES + 1 {
            many.extend_from_slice(&good[..ENTRY_LEN]);
        }
        many.extend_from_slice(&[0; ENTRY_LEN]);
        many.extend_from_slice(b"vcek-der");
        let n = many.len() as u32 - 8;
        for i in 0..=MAX_ENTRIES {
            many[i * ENTRY_LEN + 16..i * ENTRY_LEN + 20].copy_from_slice(&n.to_le_bytes());
        }
        assert!(cert_table(&many).unwrap_err().contains("more than 16"));
        // A zero GUID ends the table whatever its offset and length say.
        let mut end = table(&[(VCEK, b"vcek")]);
        end[ENTRY_LEN + 16..ENTRY_LEN + 20].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(cert_table(&end).unwrap().len(), 1);
        // Exactly MAX_ENTRIES is fine.
        let certs: Vec<(&str, &[u8])> = vec![(VCEK, b"x"); MAX_ENTRIES];
        assert_eq!(cert_table(&table(&certs)).unwrap().len(), MAX_ENTRIES);
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            /// Any bytes as a certificate table: an error or entries whose bytes lie in
            /// the blob; never a panic.
            #[test]
            fn any_table(aux in proptest::collection::vec(any::<u8>(), 0..600)) {
                if let Ok(t) = cert_table(&aux) {
                    prop_assert!(t.len() <= MAX_ENTRIES);
                    prop_assert!(t.iter().all(|c| c.data.len() <= aux.len()));
                }
            }

            /// A valid report with bytes flipped anywhere, and any auxblob: checked and
            /// parsed without a panic, errors one line.
            #[test]
            fn flipped_report(
                flips in proptest::collection::vec((0..REPORT_LEN, any::<u8>()), 0..8),
                aux in proptest::collection::vec(any::<u8>(), 0..200),
            ) {
                let mut r = report(&[7; 64], 0);
                for (at, x) in flips {
                    r[at] ^= x;
                }
                if report_data(&r).is_ok() {
                    if let Err(e) = evidence(&r, Some(&aux)) {
                        prop_assert!(!e.contains('\n'));
                    }
                }
            }
        }
    }

    #[test]
    fn the_report_is_checked_before_it_is_parsed() {
        let rd = [5u8; 64];
        assert_eq!(report_data(&report(&rd, 0)).unwrap(), rd);
        let e = report_data(&report(&rd, 1)).unwrap_err();
        assert!(e.contains("VMPL 1"), "{e}");
        let mut short = report(&rd, 0);
        short.pop();
        assert!(report_data(&short).unwrap_err().contains("1183 bytes"));
        // A family the sev crate does not know (not Milan, Genoa or Turin) is refused by it.
        let mut odd = report(&rd, 0);
        odd[0x188] = 0x17;
        let e = evidence(&odd, None).unwrap_err();
        assert!(e.contains("cannot read the SEV-SNP report"), "{e}");
    }
}
