//! `GET /`: a small landing page for people who open the server's address in a browser: whose
//! server this is, what it runs, and how to connect a Matrix client to it.
//!
//! Plain HTML without scripts. Every configured string is escaped, and the headers forbid
//! scripts, framing, content sniffing and referrers, so the page cannot be turned against the
//! people who open it.

use std::{fmt::Write as _, sync::LazyLock};

use axum::{
    extract::State as AxumState,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, header};
use sha2::{Digest, Sha256};

use super::State;
use crate::config::{Config, SupportContact};

/// The page's only style sheet, allowed by its hash in the content security policy.
const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;\
padding:0 1rem;line-height:1.5;color:#1b1d22}img{max-height:4rem;max-width:100%}\
code{background:#eef0f3;padding:.1rem .3rem;border-radius:.2rem;word-break:break-all}\
footer{margin-top:3rem;color:#6b7280;font-size:.875rem}";

/// `'sha256-…'` of [`STYLE`], for `style-src`.
static STYLE_HASH: LazyLock<String> = LazyLock::new(|| {
    use base64::Engine as _;
    let digest = Sha256::digest(STYLE.as_bytes());
    format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest))
});

/// `GET /`: the landing page.
pub async fn page(AxumState(services): AxumState<State>) -> Response {
    let config = &services.config;
    let mut csp = format!(
        "default-src 'none'; style-src {}; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'",
        *STYLE_HASH
    );
    if let Some(origin) = logo_origin(config) {
        csp.push_str("; img-src ");
        csp.push_str(&origin);
    }
    let mut response = render(config).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    if let Ok(csp) = HeaderValue::from_str(&csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The logo's origin (`https://host:port`), the only place the page loads anything from.
fn logo_origin(config: &Config) -> Option<String> {
    let url = url::Url::parse(config.branding.logo_url.as_deref()?).ok()?;
    let origin = url.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

/// What to type as the homeserver: the public URL when configured, else the listen address
/// when others can reach it (not unspecified, not loopback: `127.0.0.1` would name the
/// reader's own machine), else the server name (clients then look it up).
fn homeserver(config: &Config) -> String {
    if let Some(url) = config.client_base_url() {
        return url.to_owned();
    }
    match config.listen.first() {
        Some(addr) if !addr.ip().is_unspecified() && !addr.ip().is_loopback() => {
            format!("http://{addr}")
        }
        _ => config.server_name.to_string(),
    }
}

fn render(config: &Config) -> String {
    let server_name = escape(config.server_name.as_str());
    let company = config.branding.company_name.as_deref().map(escape);
    let title = company.as_deref().unwrap_or(&server_name);
    let mut html = String::with_capacity(4096);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n<title>{title}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
    );
    if let Some(logo) = &config.branding.logo_url {
        let _ = writeln!(html, "<img src=\"{}\" alt=\"{title}\">", escape(logo));
    }
    let _ = writeln!(html, "<h1>{title}</h1>");
    let _ = writeln!(
        html,
        "<p>This is the Matrix chat server <code>{server_name}</code>{}.</p>",
        company.as_deref().map(|c| format!(" of {c}")).unwrap_or_default()
    );
    let _ = writeln!(
        html,
        "<h2>How to connect</h2>\n<ol>\n\
         <li>Install <a href=\"https://element.io/download\">Element X</a> on your phone, or \
         open <a href=\"https://app.element.io\">Element Web</a> or any Matrix client.</li>\n\
         <li>When it asks for a homeserver (\"Change\" or \"Edit\" next to the server on the \
         sign-in screen), enter: <code>{}</code></li>\n\
         <li>Sign in with your account on <code>{server_name}</code>.</li>\n</ol>",
        escape(&homeserver(config))
    );
    render_support(&mut html, config);
    let _ = write!(
        html,
        "</main>\n<footer>Plaza {}</footer>\n</body>\n</html>\n",
        escape(env!("CARGO_PKG_VERSION"))
    );
    html
}

/// The support contacts of `/.well-known/matrix/support`, when configured.
fn render_support(html: &mut String, config: &Config) {
    let support = &config.support;
    if support.contacts.is_empty() && support.page.is_none() {
        return;
    }
    html.push_str("<h2>Help</h2>\n");
    if !support.contacts.is_empty() {
        html.push_str("<ul>\n");
        for contact in &support.contacts {
            render_contact(html, contact);
        }
        html.push_str("</ul>\n");
    }
    if let Some(page) = &support.page {
        let _ = writeln!(html, "<p><a href=\"{}\">Support page</a></p>", escape(page));
    }
}

fn render_contact(html: &mut String, contact: &SupportContact) {
    let role = match contact.role.as_str() {
        "m.role.admin" => "Administrator".to_owned(),
        "m.role.security" => "Security".to_owned(),
        other => escape(other),
    };
    let mut ways = Vec::new();
    if let Some(user_id) = &contact.matrix_id {
        let user_id = escape(user_id.as_str());
        ways.push(format!("<a href=\"https://matrix.to/#/{user_id}\">{user_id}</a>"));
    }
    if let Some(email) = &contact.email_address {
        let email = escape(email);
        ways.push(format!("<a href=\"mailto:{email}\">{email}</a>"));
    }
    let _ = writeln!(html, "<li>{role}: {}</li>", ways.join(", "));
}

/// Escapes text for HTML content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
