//! Evidence providers for KBS attestation (SEALFS_ATTESTER). Placeholder with `sample` only;
//! replaced by the full tsm/aa/sample module.

use std::path::PathBuf;

use base64::Engine;

pub enum Attester {
    Sample,
    Tsm { root: PathBuf },
    Aa { socket: PathBuf },
}

pub struct Evidence {
    pub tee: String,
    pub primary: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("set SEALFS_ATTESTER to tsm, aa or sample")]
    Unset,
    #[error("SEALFS_ATTESTER={0:?}: expected tsm, aa or sample")]
    Unknown(String),
    #[error("attester not built")]
    NotBuilt,
}

impl Attester {
    pub fn from_env() -> Result<Self, AttestError> {
        match std::env::var("SEALFS_ATTESTER").ok().as_deref() {
            None | Some("") => Err(AttestError::Unset),
            Some("sample") => Ok(Attester::Sample),
            Some(o) => Err(AttestError::Unknown(crate::format::naming::printable(
                o, 32,
            ))),
        }
    }
    pub async fn tee(&self) -> Result<String, AttestError> {
        match self {
            Attester::Sample => Ok("sample".into()),
            _ => Err(AttestError::NotBuilt),
        }
    }
    pub async fn evidence(&self, report_data: &[u8]) -> Result<Evidence, AttestError> {
        match self {
            Attester::Sample => {
                tracing::warn!(
                    "SEALFS_ATTESTER=sample: no hardware evidence (tests and demos only)"
                );
                Ok(Evidence {
                    tee: "sample".into(),
                    primary: serde_json::json!({"svn": "1",
                        "report_data": base64::engine::general_purpose::STANDARD.encode(report_data)}),
                })
            }
            _ => Err(AttestError::NotBuilt),
        }
    }
}
