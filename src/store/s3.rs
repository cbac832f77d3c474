//! S3 through aws-sdk-s3: paginated LIST, conditional ranged GETs, multipart uploads.
//!
//! Path-style addressing is used whenever a custom endpoint is configured
//! (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`), as local servers need it.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use tokio::sync::Mutex;

use super::{ObjectInfo, StoreError};

pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
}

fn classify<E>(op: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let key = key.to_string();
    if let SdkError::ServiceError(se) = &err {
        let e = se.err();
        let message = e.message().unwrap_or("").to_string();
        // The code table is crate::calls::outcome, shared with the metrics.
        match (crate::calls::outcome(&err), e.code().unwrap_or("")) {
            ("not_found", _) => return StoreError::NotFound(key),
            ("changed", _) => return StoreError::Changed(key),
            ("denied", _) => return StoreError::Denied { op, key, message },
            (_, code) if !code.is_empty() => {
                return StoreError::Failed {
                    op,
                    key,
                    message: format!("{code}: {message}"),
                }
            }
            _ => {}
        }
    }
    // HEAD errors have no body, so no code: fall back on the HTTP status.
    if let Some(status) = err.raw_response().map(|r| r.status().as_u16()) {
        match status {
            404 => return StoreError::NotFound(key),
            412 => return StoreError::Changed(key),
            403 => {
                return StoreError::Denied {
                    op,
                    key,
                    message: "HTTP 403".into(),
                }
            }
            _ => {}
        }
    }
    StoreError::Failed {
        op,
        key,
        message: crate::error_chain(&err),
    }
}

/// One S3 call, counted and classified under `op` ([`crate::calls::call`]).
async fn call<T, E>(
    op: &'static str,
    key: &str,
    req: impl std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
) -> Result<T, StoreError>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    crate::calls::call("s3", op, key, req, classify).await
}

impl S3Store {
    pub async fn new(bucket: &str) -> Result<Self, StoreError> {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let custom_endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        let s3conf = aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(custom_endpoint)
            .build();
        if s3conf.region().is_none() {
            return Err(StoreError::Failed {
                op: "configure",
                key: format!("s3://{bucket}"),
                message: "no AWS region: set AWS_REGION".into(),
            });
        }
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(s3conf),
            bucket: bucket.to_string(),
        })
    }

    pub fn describe(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        loop {
            // One page is one request: time and count each.
            let start = std::time::Instant::now();
            let Some(page) = pages.next().await else {
                break;
            };
            let outcome = page.as_ref().map_or_else(crate::calls::outcome, |_| "ok");
            crate::calls::record("s3", "ListObjectsV2", outcome, start.elapsed());
            let page = page.map_err(|e| classify("ListObjectsV2", prefix, e))?;
            for o in page.contents() {
                if let Some(key) = o.key() {
                    out.push(ObjectInfo {
                        key: key.to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        etag: o.e_tag().unwrap_or("").to_string(),
                    });
                }
            }
        }
        Ok(out)
    }

    pub async fn get(&self, key: &str) -> Result<(Bytes, String), StoreError> {
        let (body, etag) = self.get_object(key, None, None).await?;
        let body = body.collect().await.map_err(|e| StoreError::Failed {
            op: "GetObject",
            key: key.to_string(),
            message: crate::error_chain(&e),
        })?;
        Ok((body.into_bytes(), etag))
    }

    pub async fn get_range_stream(
        &self,
        key: &str,
        start: u64,
        end: u64,
        if_match: Option<&str>,
    ) -> Result<(ByteStream, String), StoreError> {
        self.get_object(key, Some((start, end)), if_match).await
    }

    /// GetObject of `[start, end)` (or all of it), pinned by `if_match`: the body and the
    /// ETag the response carried.
    async fn get_object(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        if_match: Option<&str>,
    ) -> Result<(ByteStream, String), StoreError> {
        let out = call(
            "GetObject",
            key,
            self.client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .set_range(range.map(|(start, end)| format!("bytes={start}-{}", end - 1)))
                .set_if_match(if_match.map(str::to_string))
                .send(),
        )
        .await?;
        Ok((out.body, out.e_tag.unwrap_or_default()))
    }

    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        call(
            "PutObject",
            key,
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .body(ByteStream::from(body))
                .send(),
        )
        .await?;
        Ok(())
    }

    /// PutObject with `If-Match`: S3 answers 412 (→ `Changed`) if the object is no longer
    /// the version `if_match` names.
    pub async fn put_if_match(
        &self,
        key: &str,
        body: Bytes,
        if_match: &str,
    ) -> Result<(), StoreError> {
        call(
            "PutObject",
            key,
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .if_match(if_match)
                .body(ByteStream::from(body))
                .send(),
        )
        .await?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        call(
            "DeleteObject",
            key,
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send(),
        )
        .await?;
        Ok(())
    }

    pub async fn start_upload(&self, key: &str) -> Result<S3Upload, StoreError> {
        let out = call(
            "CreateMultipartUpload",
            key,
            self.client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .send(),
        )
        .await?;
        let upload_id = out.upload_id().unwrap_or("").to_string();
        Ok(S3Upload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            upload_id,
            parts: Mutex::new(Vec::new()),
        })
    }
}

/// An S3 multipart upload: nothing is visible until CompleteMultipartUpload.
pub struct S3Upload {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    upload_id: String,
    parts: Mutex<Vec<CompletedPart>>,
}

impl S3Upload {
    pub async fn put_part(&self, number: u32, body: Bytes) -> Result<(), StoreError> {
        let out = call(
            "UploadPart",
            &self.key,
            self.client
                .upload_part()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .part_number(number as i32)
                .body(ByteStream::from(body))
                .send(),
        )
        .await?;
        let part = CompletedPart::builder()
            .part_number(number as i32)
            .set_e_tag(out.e_tag().map(str::to_string))
            .build();
        self.parts.lock().await.push(part);
        Ok(())
    }

    pub async fn complete(self) -> Result<(), StoreError> {
        let mut parts = self.parts.lock().await.split_off(0);
        parts.sort_by_key(|p| p.part_number());
        let res = call(
            "CompleteMultipartUpload",
            &self.key,
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send(),
        )
        .await;
        if res.is_err() {
            // Leave no orphaned parts behind; the completion error is the one to report.
            let _ = self.abort_upload().await;
        }
        res.map(|_| ())
    }

    pub async fn abort(self) -> Result<(), StoreError> {
        self.abort_upload().await
    }

    async fn abort_upload(&self) -> Result<(), StoreError> {
        call(
            "AbortMultipartUpload",
            &self.key,
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .send(),
        )
        .await?;
        Ok(())
    }
}
