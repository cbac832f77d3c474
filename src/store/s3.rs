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

use super::{
    bounded_key, list_bound, ListLimits, ObjectInfo, StoreError, MAX_PAGE_OBJECTS, MAX_TOKEN_LEN,
};

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
        // The store's own words: escaped and cut, they end up in log lines.
        let message = crate::format::naming::printable(e.message().unwrap_or(""), 256);
        // The code table is crate::calls::outcome, shared with the metrics.
        match (crate::calls::outcome(&err), e.code().unwrap_or("")) {
            ("not_found", _) => return StoreError::NotFound(key),
            ("changed", _) => return StoreError::Changed(key),
            ("denied", _) => return StoreError::Denied { op, key, message },
            (_, code) if !code.is_empty() => {
                let code = crate::format::naming::printable(code, 64);
                return StoreError::Failed {
                    op,
                    key,
                    message: format!("{code}: {message}"),
                };
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
        let conf =
            crate::aws_identity::apply(aws_config::defaults(aws_config::BehaviorVersion::latest()))
                .await
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

    /// ListObjectsV2 page by page, within `limits`. Every page is a request of its own (a
    /// repeated or oversized continuation token ends the listing with an error: a store
    /// could otherwise keep it going forever).
    pub async fn list(
        &self,
        prefix: &str,
        limits: &ListLimits,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let deadline = tokio::time::Instant::now() + limits.timeout;
        let mut tokens = std::collections::HashSet::new();
        let mut token: Option<String> = None;
        let mut out = Vec::new();
        for page_no in 0.. {
            if page_no >= limits.max_pages {
                return Err(list_bound(
                    prefix,
                    format!("more than {} pages", limits.max_pages),
                ));
            }
            let req = call(
                "ListObjectsV2",
                prefix,
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .set_continuation_token(token.take())
                    .send(),
            );
            let page = tokio::time::timeout_at(deadline, req).await.map_err(|_| {
                list_bound(prefix, format!("took longer than {:?}", limits.timeout))
            })??;
            let contents = page.contents();
            if contents.len() > MAX_PAGE_OBJECTS {
                return Err(list_bound(
                    prefix,
                    format!("a page held {} objects", contents.len()),
                ));
            }
            if out.len() + contents.len() > limits.max_objects {
                return Err(list_bound(
                    prefix,
                    format!(
                        "more than {} objects (raise --max-objects)",
                        limits.max_objects
                    ),
                ));
            }
            for o in contents {
                if let Some(key) = o.key() {
                    out.push(ObjectInfo {
                        key: bounded_key(key),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        etag: bounded_key(o.e_tag().unwrap_or("")),
                        modified: o
                            .last_modified()
                            .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                    });
                }
            }
            if !page.is_truncated().unwrap_or(false) {
                break;
            }
            let next = page
                .next_continuation_token()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    list_bound(
                        prefix,
                        "a truncated page without a continuation token".into(),
                    )
                })?;
            if next.len() > MAX_TOKEN_LEN {
                return Err(list_bound(
                    prefix,
                    format!("a continuation token of {} bytes", next.len()),
                ));
            }
            if !tokens.insert(next.to_string()) {
                return Err(list_bound(prefix, "a continuation token repeated".into()));
            }
            token = Some(next.to_string());
        }
        Ok(out)
    }

    /// A whole object, read until `max_len`: a longer body fails without being buffered.
    pub async fn get(&self, key: &str, max_len: usize) -> Result<(Bytes, String), StoreError> {
        let (mut body, etag) = self.get_object(key, None, None).await?;
        let mut out = bytes::BytesMut::new();
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| StoreError::Failed {
                op: "GetObject",
                key: key.to_string(),
                message: crate::error_chain(&e),
            })?;
            if out.len() + piece.len() > max_len {
                return Err(StoreError::Bound {
                    what: "object",
                    key: key.to_string(),
                    reason: format!("larger than {max_len} bytes"),
                });
            }
            out.extend_from_slice(&piece);
        }
        Ok((out.freeze(), etag))
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
        // A store that ignores Range answers with the whole object: refuse it before a
        // byte of the body is read, instead of reading it to find out.
        if let Some((start, end)) = range {
            let want = format!("bytes {start}-{}/", end - 1);
            let ok = out.content_range().is_some_and(|r| r.starts_with(&want))
                && out.content_length() == Some((end - start) as i64);
            if !ok {
                return Err(StoreError::Failed {
                    op: "GetObject",
                    key: key.to_string(),
                    message: format!(
                        "asked for bytes {start}-{}, answered {:?} ({:?} bytes): Range ignored",
                        end - 1,
                        out.content_range().unwrap_or("no Content-Range"),
                        out.content_length()
                    ),
                });
            }
        }
        Ok((out.body, bounded_key(&out.e_tag.unwrap_or_default())))
    }

    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        self.put_object(key, body, None).await
    }

    /// PutObject with `If-Match`: S3 answers 412 (→ `Changed`) if the object is no longer
    /// the version `if_match` names.
    pub async fn put_if_match(
        &self,
        key: &str,
        body: Bytes,
        if_match: &str,
    ) -> Result<(), StoreError> {
        self.put_object(key, body, Some(if_match)).await
    }

    async fn put_object(
        &self,
        key: &str,
        body: Bytes,
        if_match: Option<&str>,
    ) -> Result<(), StoreError> {
        call(
            "PutObject",
            key,
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .set_if_match(if_match.map(str::to_string))
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
