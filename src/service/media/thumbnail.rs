//! Thumbnails: which size to make for a request, and making it. Decoding is bounded (pixel
//! count, allocation, frame count) so a decompression bomb is refused rather than crashed on.

use std::{io::Cursor, path::Path};

use image::{
    AnimationDecoder, DynamicImage, Frame, ImageDecoder, ImageFormat, ImageReader, Limits,
    RgbaImage,
    codecs::{
        gif::{GifDecoder, GifEncoder, Repeat},
        jpeg::JpegEncoder,
    },
};

use crate::error::{Error, ErrorKind, Result};

/// Largest edge of a thumbnail made on demand.
const MAX_EDGE: u32 = 1600;
/// Frames kept from an animated GIF thumbnail.
const MAX_FRAMES: usize = 200;
/// Bytes the decoder may allocate for one image.
const MAX_ALLOC: u64 = 512 * 1024 * 1024;

/// A thumbnail size and method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `crop` (fill exactly) rather than `scale` (fit inside).
    pub crop: bool,
    /// Keep animation (GIF sources only).
    pub animated: bool,
}

impl Spec {
    /// The spec's key in the thumbnail table.
    pub fn key(&self) -> String {
        let method = if self.crop { "crop" } else { "scale" };
        let animated = if self.animated { "-animated" } else { "" };
        format!("{}x{}-{method}{animated}", self.width, self.height)
    }
}

const fn spec(width: u32, height: u32, crop: bool) -> Spec {
    Spec { width, height, crop, animated: false }
}

/// Sizes made for every uploaded image, as clients commonly request them.
pub const STANDARD: [Spec; 5] = [
    spec(32, 32, true),
    spec(96, 96, true),
    spec(320, 240, false),
    spec(640, 480, false),
    spec(800, 600, false),
];

/// The spec to serve for a request: the smallest standard size that is at least as large (with
/// the same shape, for crops), else the request itself within the on-demand limit.
pub fn choose(requested: Spec) -> Spec {
    let standard = STANDARD.iter().find(|s| {
        s.crop == requested.crop
            && s.width >= requested.width
            && s.height >= requested.height
            && (!s.crop || s.width * requested.height == s.height * requested.width)
    });
    match standard {
        Some(s) => Spec { animated: requested.animated, ..*s },
        None => Spec {
            width: requested.width.clamp(1, MAX_EDGE),
            height: requested.height.clamp(1, MAX_EDGE),
            ..requested
        },
    }
}

/// Whether a content type is one thumbnails are made of.
pub fn is_thumbnailable(content_type: Option<&str>) -> bool {
    let essence = super::essence(content_type.unwrap_or(""));
    matches!(
        essence.as_str(),
        "image/jpeg" | "image/jpg" | "image/png" | "image/gif" | "image/webp"
    )
}

/// An encoded thumbnail.
pub struct Thumbnail {
    /// The encoded image.
    pub bytes: Vec<u8>,
    /// Its content type.
    pub content_type: &'static str,
    /// Pixel width.
    pub width: u32,
    /// Pixel height.
    pub height: u32,
}

fn cannot(reason: &str) -> Error {
    Error::new(ErrorKind::Unknown, format!("Cannot generate a thumbnail: {reason}"))
}

fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(65_535);
    limits.max_image_height = Some(65_535);
    limits.max_alloc = Some(MAX_ALLOC);
    limits
}

fn reader(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    let mut reader = ImageReader::open(path)
        .map_err(Error::internal)?
        .with_guessed_format()
        .map_err(Error::internal)?;
    reader.limits(limits());
    Ok(reader)
}

/// The content type and pixel size of the image at `path`, read from its header: `None`
/// unless it is a format thumbnails are served in (for thumbnails other servers made).
pub fn probe(path: &Path) -> Result<Option<(&'static str, u32, u32)>> {
    let reader = reader(path)?;
    let content_type = match reader.format() {
        Some(ImageFormat::Jpeg) => "image/jpeg",
        Some(ImageFormat::Png) => "image/png",
        Some(ImageFormat::Gif) => "image/gif",
        Some(ImageFormat::WebP) => "image/webp",
        _ => return Ok(None),
    };
    Ok(reader.into_dimensions().ok().map(|(width, height)| (content_type, width, height)))
}

/// Decodes the image at `path` once and renders every spec from it.
pub fn render(
    path: &Path,
    specs: &[Spec],
    max_pixels: u64,
) -> Result<Vec<(Spec, Result<Thumbnail>)>> {
    let format = reader(path)?.format();
    if !matches!(
        format,
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP)
    ) {
        return Err(cannot("not a supported image"));
    }
    let scaled = if format == Some(ImageFormat::Jpeg) {
        jpeg_scaled(path, specs, max_pixels)?
    } else {
        None
    };
    let image = match scaled {
        Some(image) => image,
        None => {
            let (width, height) = reader(path)?
                .into_dimensions()
                .map_err(|_| cannot("the image could not be decoded"))?;
            if u64::from(width) * u64::from(height) > max_pixels {
                return Err(cannot("the image has too many pixels"));
            }
            let mut decoder = reader(path)?
                .into_decoder()
                .map_err(|_| cannot("the image could not be decoded"))?;
            let orientation = decoder.orientation().ok();
            let mut image = DynamicImage::from_decoder(decoder)
                .map_err(|_| cannot("the image could not be decoded"))?;
            if let Some(orientation) = orientation {
                image.apply_orientation(orientation);
            }
            image
        }
    };
    let as_jpeg = format == Some(ImageFormat::Jpeg);
    let animated_source = format == Some(ImageFormat::Gif);
    Ok(specs
        .iter()
        .map(|spec| {
            let made = if spec.animated && animated_source {
                animated_gif(path, *spec, max_pixels).or_else(|_| still(&image, *spec, as_jpeg))
            } else {
                still(&image, *spec, as_jpeg)
            };
            (*spec, made)
        })
        .collect())
}

/// Decodes a JPEG, upright, at the smallest of its built-in reduced scales (1/8, 1/4, 1/2)
/// that still covers every spec: a camera photo then costs a sixteenth of the memory and time
/// of a full decode, and the file is streamed rather than read whole. `None` when no reduced
/// scale will do, the pixels are neither plain RGB nor grey, or this decoder cannot read the
/// file; the caller then decodes in full.
fn jpeg_scaled(path: &Path, specs: &[Spec], max_pixels: u64) -> Result<Option<DynamicImage>> {
    use image::metadata::Orientation;
    use jpeg_decoder::{CodingProcess, PixelFormat};
    let file = std::io::BufReader::new(std::fs::File::open(path).map_err(Error::internal)?);
    let mut decoder = jpeg_decoder::Decoder::new(file);
    decoder.set_max_decoding_buffer_size(MAX_ALLOC as usize);
    // Anything this decoder cannot read (a truncated file, say) goes to the full decoder.
    if decoder.read_info().is_err() {
        return Ok(None);
    }
    let Some(info) = decoder.info() else { return Ok(None) };
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(cannot("the image has too many pixels"));
    }
    let channels = match info.pixel_format {
        PixelFormat::RGB24 => 3,
        PixelFormat::L8 => 1,
        _ => return Ok(None),
    };
    // Lossless JPEGs ignore the scale.
    if info.coding_process == CodingProcess::Lossless {
        return Ok(None);
    }
    // The orientation sits in a marker before the frame header, so it is known by now.
    let orientation = decoder.exif_data().and_then(Orientation::from_exif_chunk);
    let turned = orientation.is_some_and(|o| {
        matches!(
            o,
            Orientation::Rotate90
                | Orientation::Rotate270
                | Orientation::Rotate90FlipH
                | Orientation::Rotate270FlipH
        )
    });
    let shown = if turned { (height, width) } else { (width, height) };
    let (need_w, need_h) = specs
        .iter()
        .map(|spec| starting_size(shown, *spec))
        .fold((1, 1), |(w, h), (sw, sh)| (w.max(sw), h.max(sh)));
    let need = if turned { (need_h, need_w) } else { (need_w, need_h) };
    // jpeg-decoder's rounding of a scaled edge.
    let edge = |len: u32, eighths: u32| (len * eighths).saturating_sub(1) / 8 + 1;
    let Some(eighths) =
        [1, 2, 4].into_iter().find(|&e| edge(width, e) >= need.0 && edge(height, e) >= need.1)
    else {
        return Ok(None);
    };
    let (Ok(w), Ok(h)) =
        (u16::try_from(edge(width, eighths)), u16::try_from(edge(height, eighths)))
    else {
        return Ok(None);
    };
    // The decoder settles for a scale that is large enough in one axis; both must be.
    let Ok((w, h)) = decoder.scale(w, h) else { return Ok(None) };
    let (w, h) = (u32::from(w), u32::from(h));
    if w < need.0 || h < need.1 {
        return Ok(None);
    }
    let Ok(pixels) = decoder.decode() else { return Ok(None) };
    if pixels.len() as u64 != u64::from(w) * u64::from(h) * channels {
        return Ok(None);
    }
    let image = if channels == 3 {
        image::RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8)
    } else {
        image::GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8)
    };
    let Some(mut image) = image else { return Ok(None) };
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    Ok(Some(image))
}

/// The size a spec's resize starts from: the target itself, or for a crop the size that covers
/// it before the middle is cut out.
fn starting_size(source: (u32, u32), spec: Spec) -> (u32, u32) {
    let (tw, th) = target(source, spec);
    if !spec.crop {
        return (tw, th);
    }
    let (sw, sh) = (source.0.max(1) as f64, source.1.max(1) as f64);
    let ratio = (tw as f64 / sw).max(th as f64 / sh);
    (((sw * ratio).ceil() as u32).max(tw), ((sh * ratio).ceil() as u32).max(th))
}

/// The target size: fit inside (scale) or fill exactly (crop), never larger than the source.
fn target(source: (u32, u32), spec: Spec) -> (u32, u32) {
    let (sw, sh) = (source.0.max(1) as f64, source.1.max(1) as f64);
    let (w, h) = (spec.width as f64, spec.height as f64);
    let factor =
        if spec.crop { (sw / w).min(sh / h).min(1.0) } else { (w / sw).min(h / sh).min(1.0) };
    if spec.crop {
        (((w * factor).round() as u32).max(1), ((h * factor).round() as u32).max(1))
    } else {
        (((sw * factor).round() as u32).max(1), ((sh * factor).round() as u32).max(1))
    }
}

fn resize(image: &DynamicImage, spec: Spec) -> DynamicImage {
    let source = (image.width(), image.height());
    let (tw, th) = target(source, spec);
    if !spec.crop {
        return image.thumbnail_exact(tw, th);
    }
    // Cover the target, then cut the middle.
    let (cw, ch) = starting_size(source, spec);
    image.thumbnail_exact(cw, ch).crop_imm((cw - tw) / 2, (ch - th) / 2, tw, th)
}

fn still(image: &DynamicImage, spec: Spec, as_jpeg: bool) -> Result<Thumbnail> {
    let small = resize(image, spec);
    let mut bytes = Vec::new();
    let content_type = if as_jpeg {
        let rgb = small.to_rgb8();
        JpegEncoder::new_with_quality(&mut bytes, 85)
            .encode_image(&rgb)
            .map_err(Error::internal)?;
        "image/jpeg"
    } else {
        small.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png).map_err(Error::internal)?;
        "image/png"
    };
    Ok(Thumbnail { bytes, content_type, width: small.width(), height: small.height() })
}

fn animated_gif(path: &Path, spec: Spec, max_pixels: u64) -> Result<Thumbnail> {
    let file = std::io::BufReader::new(std::fs::File::open(path).map_err(Error::internal)?);
    let mut decoder = GifDecoder::new(file).map_err(|_| cannot("bad GIF"))?;
    decoder.set_limits(limits()).map_err(|_| cannot("GIF too large"))?;
    let (width, height) = decoder.dimensions();
    let frame_pixels = u64::from(width) * u64::from(height);
    let (tw, th) = target((width, height), spec);
    let mut frames = Vec::new();
    let mut decoded_pixels = 0u64;
    for frame in decoder.into_frames().take(MAX_FRAMES) {
        let frame = frame.map_err(|_| cannot("bad GIF frame"))?;
        decoded_pixels += frame_pixels;
        if decoded_pixels > max_pixels.saturating_mul(4) {
            break;
        }
        let delay = frame.delay();
        let small = resize(
            &DynamicImage::ImageRgba8(frame.into_buffer()),
            Spec { width: tw, height: th, ..spec },
        );
        let buffer: RgbaImage = small.to_rgba8();
        frames.push(Frame::from_parts(buffer, 0, 0, delay));
    }
    let Some(first) = frames.first() else { return Err(cannot("GIF without frames")) };
    let (w, h) = first.buffer().dimensions();
    let mut bytes = Vec::new();
    {
        let mut encoder = GifEncoder::new_with_speed(&mut bytes, 10);
        encoder.set_repeat(Repeat::Infinite).map_err(Error::internal)?;
        encoder.encode_frames(frames).map_err(Error::internal)?;
    }
    Ok(Thumbnail { bytes, content_type: "image/gif", width: w, height: h })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_snap_to_standard_sizes() {
        let req = |w, h, crop| Spec { width: w, height: h, crop, animated: false };
        assert_eq!(choose(req(32, 32, true)), STANDARD[0]);
        assert_eq!(choose(req(50, 50, true)), STANDARD[1]);
        assert_eq!(choose(req(300, 200, false)), STANDARD[2]);
        assert_eq!(choose(req(100, 50, true)), req(100, 50, true));
        assert_eq!(choose(req(5000, 5000, false)), req(1600, 1600, false));
    }

    #[test]
    fn targets_keep_aspect_and_never_upscale() {
        let s = |w, h, crop| Spec { width: w, height: h, crop, animated: false };
        assert_eq!(target((4000, 3000), s(320, 240, false)), (320, 240));
        assert_eq!(target((4000, 2000), s(320, 240, false)), (320, 160));
        assert_eq!(target((100, 50), s(800, 600, false)), (100, 50));
        assert_eq!(target((4000, 3000), s(96, 96, true)), (96, 96));
        assert_eq!(target((50, 40), s(96, 96, true)), (40, 40));
    }

    fn photo(dir: &Path, width: u32, height: u32) -> std::path::PathBuf {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
        });
        let path = dir.join("photo.jpg");
        DynamicImage::ImageRgb8(image).save_with_format(&path, ImageFormat::Jpeg).unwrap();
        path
    }

    #[test]
    fn jpegs_decode_at_the_smallest_scale_that_still_covers_every_spec() {
        let dir = tempfile::tempdir().unwrap();
        let path = photo(dir.path(), 800, 600);
        let size = |w, h| {
            jpeg_scaled(&path, &[spec(w, h, true)], 100_000_000)
                .unwrap()
                .map(|i| (i.width(), i.height()))
        };
        assert_eq!(size(100, 75), Some((100, 75)));
        assert_eq!(size(101, 75), Some((200, 150)));
        assert_eq!(size(100, 200), Some((400, 300)));
        assert_eq!(size(401, 10), None);
        assert!(jpeg_scaled(&path, &[spec(10, 10, true)], 1000).is_err());

        // Cut short: left to the full decoder, which still makes the thumbnail.
        let whole = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.jpg");
        std::fs::write(&cut, &whole[..whole.len() - 2]).unwrap();
        assert!(jpeg_scaled(&cut, &[STANDARD[0]], 100_000_000).unwrap().is_none());
        let made = render(&cut, &[STANDARD[0]], 100_000_000).unwrap();
        assert!(made[0].1.is_ok());

        // A 4-pixel-wide strip: the decoder's own choice of scale would be too small.
        let strip = dir.path().join("strip.jpg");
        DynamicImage::ImageRgb8(image::RgbImage::new(4, 1000))
            .save_with_format(&strip, ImageFormat::Jpeg)
            .unwrap();
        let made = render(&strip, &[STANDARD[2]], 100_000_000).unwrap();
        let thumb = made[0].1.as_ref().unwrap();
        assert_eq!((thumb.width, thumb.height), (1, 240));

        // Grey photos take the scaled path too.
        let grey = dir.path().join("grey.jpg");
        DynamicImage::ImageLuma8(image::GrayImage::from_fn(800, 600, |x, _| {
            image::Luma([x as u8])
        }))
        .save_with_format(&grey, ImageFormat::Jpeg)
        .unwrap();
        let small = jpeg_scaled(&grey, &[spec(100, 75, true)], 100_000_000).unwrap().unwrap();
        assert_eq!((small.width(), small.height(), small.color()), (100, 75, image::ColorType::L8));

        let specs = [STANDARD[0], STANDARD[2], spec(100, 50, true), spec(5000, 5000, false)];
        let made = render(&path, &specs, 100_000_000).unwrap();
        let sizes: Vec<_> =
            made.iter().map(|(_, t)| t.as_ref().map(|t| (t.width, t.height)).unwrap()).collect();
        assert_eq!(sizes, [(32, 32), (320, 240), (100, 50), (800, 600)]);
    }
}
