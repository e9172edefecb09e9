//! Content repository scenarios: upload and download throughput, thumbnailing a camera-sized
//! JPEG, and the memory a 1 GiB streamed upload costs.

use std::{
    io::Cursor,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Error, Target, User, rss_mb};

const MIB: usize = 1024 * 1024;
const UPLOADS: usize = 256;
const CONCURRENCY: usize = 16;

async fn upload(
    target: &Target,
    user: &User,
    content_type: &str,
    body: reqwest::Body,
) -> Result<String, Error> {
    let response = target
        .http
        .post(format!("{}/_matrix/media/v3/upload", target.base))
        .bearer_auth(&user.token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    let uri =
        body["content_uri"].as_str().ok_or_else(|| format!("upload failed ({status}): {body}"))?;
    Ok(uri.trim_start_matches("mxc://").to_owned())
}

/// Runs `count` jobs, `CONCURRENCY` at a time.
async fn concurrently<F, Fut>(count: usize, job: F) -> Result<Vec<String>, Error>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<String, Error>> + Send + 'static,
{
    let mut results = Vec::with_capacity(count);
    let mut running = tokio::task::JoinSet::new();
    for i in 0..count {
        if running.len() >= CONCURRENCY {
            results.push(running.join_next().await.ok_or("no job")???);
        }
        running.spawn(job(i));
    }
    while let Some(result) = running.join_next().await {
        results.push(result??);
    }
    Ok(results)
}

/// The media rows of the table.
pub async fn rows(target: &Target, user: &User) -> Result<Vec<[String; 3]>, Error> {
    let mut rows = Vec::new();

    // 1 MiB uploads, each distinct so none is deduplicated.
    let started = Instant::now();
    let ids = concurrently(UPLOADS, |i| {
        let (target, user) = (target.clone(), user.clone());
        async move {
            let mut body = vec![7u8; MIB];
            body[..8].copy_from_slice(&(i as u64).to_be_bytes());
            upload(&target, &user, "application/octet-stream", body.into()).await
        }
    })
    .await?;
    let upload_rate = UPLOADS as f64 / started.elapsed().as_secs_f64();
    rows.push([
        format!("upload, 1 MiB × {UPLOADS}, {CONCURRENCY} at a time, durable 200s"),
        "≥ 500 MiB/s".into(),
        format!("{upload_rate:.0} MiB/s"),
    ]);

    let started = Instant::now();
    let rounds = 4;
    concurrently(UPLOADS * rounds, |i| {
        let (target, user) = (target.clone(), user.clone());
        let id = ids[i % ids.len()].clone();
        async move {
            let url = format!("{}/_matrix/client/v1/media/download/{id}", target.base);
            let bytes = target.http.get(url).bearer_auth(&user.token).send().await?.bytes().await?;
            if bytes.len() != MIB {
                return Err(format!("download of {id} returned {} bytes", bytes.len()).into());
            }
            Ok(String::new())
        }
    })
    .await?;
    let download_rate = (UPLOADS * rounds) as f64 / started.elapsed().as_secs_f64() / 1024.0;
    rows.push([
        format!("download, 1 MiB × {}, {CONCURRENCY} at a time", UPLOADS * rounds),
        "≥ 1 GiB/s".into(),
        format!("{download_rate:.2} GiB/s"),
    ]);

    // A 12-megapixel photo; sizes nobody asked for yet, so each is made on demand.
    let photo = {
        let image = image::RgbImage::from_fn(4000, 3000, |x, y| {
            image::Rgb([(x / 16) as u8, (y / 12) as u8, ((x + y) / 28) as u8])
        });
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)?;
        out
    };
    let id = upload(target, user, "image/jpeg", photo.into()).await?;
    let thumbnail = |query: String| {
        let url = format!("{}/_matrix/client/v1/media/thumbnail/{id}?{query}", target.base);
        let request = target.http.get(url).bearer_auth(&user.token);
        async move {
            let started = Instant::now();
            let response = request.send().await?;
            if !response.status().is_success() {
                return Err(format!("thumbnail failed: {}", response.status()).into());
            }
            response.bytes().await?;
            Ok::<_, Error>(started.elapsed())
        }
    };
    // Let the background pre-generation of the standard sizes finish first.
    thumbnail("width=800&height=600".into()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut times = Vec::new();
    for edge in 150..155 {
        times.push(thumbnail(format!("width={edge}&height={edge}&method=crop")).await?);
    }
    times.sort();
    rows.push([
        "thumbnail of a 4000×3000 JPEG, made on demand (median of 5)".into(),
        "< 150 ms".into(),
        format!("{:.0} ms", times[2].as_secs_f64() * 1e3),
    ]);

    // 1 GiB streamed in 64 KiB chunks while RSS is sampled.
    let before = rss_mb();
    let peak_kb = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak_kb = peak_kb.clone();
        tokio::spawn(async move {
            loop {
                if let Some(now) = rss_mb() {
                    peak_kb.fetch_max((now * 1024.0) as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let chunks = futures_util::stream::iter((0..16 * 1024).map(|i: u32| {
        let mut chunk = vec![3u8; 64 * 1024];
        chunk[..4].copy_from_slice(&i.to_be_bytes());
        Ok::<_, std::io::Error>(chunk)
    }));
    let started = Instant::now();
    upload(target, user, "video/mp4", reqwest::Body::wrap_stream(chunks)).await?;
    let elapsed = started.elapsed();
    sampler.abort();
    let peak = peak_kb.load(Ordering::Relaxed) as f64 / 1024.0;
    let growth = match before {
        Some(before) if peak > 0.0 => format!("{:.0} MB", (peak - before).max(0.0)),
        _ => "n/a".into(),
    };
    rows.push([
        "upload 1 GiB streamed: RSS growth".into(),
        "< 32 MB".into(),
        format!("{growth} ({:.0} MiB/s)", 1024.0 / elapsed.as_secs_f64()),
    ]);
    Ok(rows)
}
