//! Dapeng's routing rules (`/soa/config/routes/<service>`) and cookie rules
//! (`/soa/config/cookies/<service>`): lexer, parser with positions, and executor.
//!
//! ```text
//! routes  := route (EOL route)*                 ; first match wins
//! route   := left '=>' right
//! left    := 'otherwise' | matcher (';' matcher)*  ; ';' is AND
//! matcher := ID 'match' pattern (',' pattern)*     ; ',' is OR
//! pattern := '~' pattern | 'str' | "str" | r'regex' | N..M | N
//!          | ip'a.b.c.d[/mask]' | %'Bn+K' | %'Bn+A..B'
//! right   := target (',' target)* ; target := ['~'] ip'a.b.c.d[/mask][:port]' | ['~'] v'1.0.0'
//! cookie rule right side := c'key#value' (',' c'key#value')*
//! ```
//! IDs: service, method, version, userId, callerIp, calleeIp, userIp, `cookie_<name>`. An
//! unknown ID or a missing value never matches, also under `~`. Regexes match the whole value;
//! ranges are inclusive. Plain targets are a whitelist, `~` targets a blacklist; an instance
//! must pass both; port 0 or no port means any port. Lines end at `\n`, `\r\n` or a lone
//! `\r`, as in Dapeng's lexer.
//!
//! The language is the one Dapeng's lexer and parser accept, read as they read it, so a rules
//! node Java consumers use means the same here (where it goes further, see below):
//! - the text is trimmed first (Java's `trim`); inside it, a lone `\r` also swallows the
//!   character after it (Dapeng looks for the `\n` of `\r\n` and does not step back);
//! - the character after an opening quote is always text: `''` does not close, `'''` is `'`;
//! - `%'Bn+K'` and `%'Bn+A..B'` follow Dapeng's pattern `([0-9]+)n\+(([0-9]+)..)?([0-9]+)`,
//!   whose `..` is any two characters: `%'1024n+1023'` is the range 1..3 there and here, and
//!   `%'1024n+2ab4'` is 2..4. Bounds outside `0..B`, or a low bound above the high one, parse
//!   and match what they can (nothing, or part);
//! - a number is a sign or digit and every digit and `.` after it; with `..` in it, Java's
//!   `split("\\..")` cuts it at each `.` and the character after it, and the first two pieces
//!   are the bounds (`1..2.5` is 1..2); a range whose low bound is above its high one (`5..2`)
//!   parses and matches nothing;
//! - a two-digit mask is Java's shift, which takes the distance mod 32: `/00` is /32 and `/40`
//!   is /8; an `ip'..'` pattern may name a port, which it ignores;
//! - a quoted text may span lines; IDs may use any letters and digits (`cookie_门店`), and
//!   dots after the first (`cookie_user.id`); a cookie's name may be empty, and its value
//!   holds no `#`.
//!
//! Beyond Dapeng: a single-digit mask, a first octet of 0, one-digit ports, a `+` before a
//! mask or port, numbers beyond a Java `int`, spaces other than space and tab between tokens,
//! and blank lines between cookie rules are accepted here, where Dapeng rejects the whole
//! node. On a node it cannot parse, Dapeng routes every call to every instance; the service
//! view keeps the rules it had instead (see [`crate::discovery`]). Short of Dapeng: ports
//! above 65535 and an ID starting with a character no token starts with are refused here, and
//! a node with junk after a rule's targets is refused whole, where Dapeng keeps the rules
//! before it.
//!
//! Matching is Dapeng's executor's (`RoutesExecutor`), so Java and Rust consumers reading one
//! rules node route every call alike, also where that executor is surprising:
//! - a value that is empty or only spaces (Java's `trim`) is missing;
//! - `callerIp`, `calleeIp` and `userIp` are Java `int`s: their text is the address as a
//!   signed 32-bit number (`192.168.10.130` is `-1062729086`), which text, regex and number
//!   patterns see; `ip'..'` patterns compare addresses as such;
//! - numbers are read as Java's `Long.parseLong` reads them (no surrounding spaces); a value
//!   that is no number fails a number or `%` pattern, but a range or `ip'..'` pattern throws
//!   in Java, and the whole rule is skipped (also under `~`, and whatever patterns follow it in
//!   the matcher; patterns before it that match still decide);
//! - a route's ip targets and its version targets each filter the instances (the releases
//!   with `v'..'` targets filter by ip, then by version): an instance must pass both kinds;
//!   versions compare ignoring case;
//! - a cookie rule that names one cookie twice is skipped (Java's executor fails on it).
//!
//! Regexes are the [`regex`] crate's syntax, which is Java's without look-around,
//! backreferences and `\Q...\E` (it guarantees linear-time matching on the call path). A rule
//! using those is rejected with its position, like any syntax error; write it with `~`
//! instead (`method match ~r'get.*'` for Java's `(?!get).*`). `\d`, `\w`, `\s`, the POSIX
//! classes (`\p{Alpha}`...) and their negations are read as Java's, which know ASCII only
//! (`r'\w+'` does not match `张三` in Dapeng, and does not here), and `\v` as Java's vertical
//! whitespace. Still Unicode-aware here and ASCII-only in Java: `(?i)`; and `.` also matches
//! `\r`, U+0085, U+2028 and U+2029 here.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::Ipv4Addr;

use regex::Regex;

use crate::error::ParseError;
use crate::layout::Instance;

/// An IPv4 network `a.b.c.d/mask` (mask 0..=32; a bare address is /32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    /// Network address (host bits as written).
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        // A prefix over 32 (the fields are public) counts as 32 rather than overflowing the shift.
        let mask = u32::MAX
            .checked_shl(32u32.saturating_sub(u32::from(self.prefix)))
            .unwrap_or(0);
        u32::from(self.addr) & mask == u32::from(ip) & mask
    }

    fn parse(text: &str) -> Result<IpNet, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, m)) => (
                a,
                match m.parse::<u8>() {
                    // Dapeng's form: Java's `-1 << (32 - mask)` shifts by the distance mod 32.
                    Ok(mask) if m.len() == 2 && m.bytes().all(|b| b.is_ascii_digit()) => {
                        32 - (32 - i32::from(mask)).rem_euclid(32) as u8
                    }
                    Ok(mask) if mask <= 32 => mask,
                    _ => return Err(format!("mask {m:?} is not 0..32 or two digits")),
                },
            ),
            None => (text, 32),
        };
        let addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        Ok(IpNet { addr, prefix })
    }
}

/// A regex that matches whole values; compares by its source.
#[derive(Clone, Debug)]
pub struct WholeRegex {
    source: String,
    regex: Regex,
}

impl PartialEq for WholeRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for WholeRegex {}

/// One pattern of a matcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `~p`: the value is present and `p` does not match it. The parser folds a run of `~`
    /// to its parity, so parsed patterns never nest `Not`.
    Not(Box<Pattern>),
    /// `'text'`: equal strings.
    Exact(String),
    /// `r'regex'`: the whole value matches.
    Regex(WholeRegex),
    /// `N`: the value is this integer.
    Int(i64),
    /// `N..M`: the value is an integer in the inclusive range (a value that is no integer
    /// skips the rule, see the module docs).
    Range(i64, i64),
    /// `ip'a.b.c.d/m'`: the value, a Java `int` as Dapeng holds addresses, is an IPv4
    /// address in the network (a value that is no `int` skips the rule).
    Ip(IpNet),
    /// `%'Bn+A..B'` (or `+K`): the value's remainder by `base` is in `low..=high`. The
    /// remainder is Java's `%`, as in Dapeng's executor: it takes the value's sign, so a
    /// negative value's is negative or 0, never the positive remainder a parsed bound
    /// names, and a mixed fleet routes every user ID alike. A hand-built one whose
    /// remainder cannot be computed (`base` 0) matches nothing.
    Modulo {
        /// The modulus.
        base: i64,
        /// Lowest remainder that matches.
        low: i64,
        /// Highest remainder that matches.
        high: i64,
    },
}

/// A pattern Dapeng's executor throws on for the value (a range or an `ip'..'` pattern on a
/// value that is no number): the rule is skipped, as that executor skips it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Unreadable;

/// Whether a pattern matches a value, or the rule is skipped.
type Outcome = Result<bool, Unreadable>;

/// The outcome of patterns tried in order, as Java tries them: the first that matches or
/// throws decides.
fn first_decisive(outcomes: impl IntoIterator<Item = Outcome>) -> Outcome {
    for outcome in outcomes {
        if outcome != Ok(false) {
            return outcome;
        }
    }
    Ok(false)
}

/// A number as Java's `Long.parseLong` reads it (a sign, ASCII digits, no spaces).
fn java_long(text: &str) -> Option<i64> {
    text.parse().ok()
}

/// [`java_long`] of a rule's number, or the parse error that names it.
fn rule_long(piece: &str) -> Result<i64, String> {
    java_long(piece).ok_or_else(|| format!("{piece:?} is not a 64-bit integer"))
}

/// An address as Dapeng holds it: a Java `int`, the address's bits, signed.
fn java_int(ip: Ipv4Addr) -> i64 {
    i64::from(u32::from(ip) as i32)
}

/// Whether Java's `trim` leaves nothing (it strips every character up to U+0020).
fn java_blank(text: &str) -> bool {
    text.chars().all(|c| c <= ' ')
}

impl Pattern {
    /// [`on_text`](Pattern::on_text) of the number's text, decided without the text; `None`
    /// for patterns that need it (exact text, regex).
    fn on_number(&self, value: i64) -> Option<Outcome> {
        Some(match self {
            Pattern::Not(inner) => inner.on_number(value)?.map(|m| !m),
            Pattern::Exact(_) | Pattern::Regex(_) => return None,
            Pattern::Int(n) => Ok(value == *n),
            Pattern::Range(a, b) => Ok((*a..=*b).contains(&value)),
            // Checked: the fields are public, and a base of 0 (or -1 with i64::MIN) would
            // panic; a remainder that cannot be computed matches nothing.
            Pattern::Modulo { base, low, high } => Ok(value
                .checked_rem(*base)
                .is_some_and(|r| (*low..=*high).contains(&r))),
            // Java's `Integer.parseInt`: a number beyond an `int` throws.
            Pattern::Ip(net) => i32::try_from(value)
                .map(|bits| net.contains(Ipv4Addr::from(bits as u32)))
                .map_err(|_| Unreadable),
        })
    }

    /// Whether the pattern matches a (non-blank) value, as Dapeng's `matcherPattern` decides.
    fn on_text(&self, value: &str) -> Outcome {
        match self {
            Pattern::Not(inner) => inner.on_text(value).map(|m| !m),
            Pattern::Exact(s) => Ok(value == s),
            Pattern::Regex(r) => Ok(r.regex.is_match(value)),
            // Java catches the parse error of these: no match.
            Pattern::Int(_) | Pattern::Modulo { .. } => {
                Ok(java_long(value).is_some_and(|v| self.on_number(v) == Some(Ok(true))))
            }
            // ...and not of these.
            Pattern::Range(..) | Pattern::Ip(_) => java_long(value)
                .and_then(|v| self.on_number(v))
                .unwrap_or(Err(Unreadable)),
        }
    }

    #[cfg(test)]
    fn matches(&self, value: &str) -> bool {
        !java_blank(value) && self.on_text(value) == Ok(true)
    }
}

/// `ID match p1, p2`: true when the ID has a value and any pattern matches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher {
    /// The ID (`method`, `userId`, `cookie_storeId`...).
    pub id: String,
    /// Alternatives.
    pub patterns: Vec<Pattern>,
}

/// The left side of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Always true.
    Otherwise,
    /// Every matcher must hold.
    All(Vec<Matcher>),
}

/// A target of a route's right side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `ip'a.b.c.d[/m][:port]'`.
    Ip {
        /// Network.
        net: IpNet,
        /// Port (`None` or 0: any).
        port: Option<u16>,
        /// `~`: blacklist.
        negated: bool,
    },
    /// `v'1.0.0'`.
    Version {
        /// Exact version.
        version: String,
        /// `~`: blacklist.
        negated: bool,
    },
}

impl Target {
    fn negated(&self) -> bool {
        match self {
            Target::Ip { negated, .. } | Target::Version { negated, .. } => *negated,
        }
    }

    fn matches(&self, instance: &Instance) -> bool {
        match self {
            Target::Ip { net, port, .. } => {
                net.contains(instance.address.ip)
                    && port.is_none_or(|p| p == 0 || p == instance.address.port)
            }
            // Java's `equalsIgnoreCase`, as Dapeng compares them.
            Target::Version { version, .. } => instance.version.as_deref().is_some_and(|v| {
                v.eq_ignore_ascii_case(version)
                    || v.chars()
                        .flat_map(char::to_lowercase)
                        .eq(version.chars().flat_map(char::to_lowercase))
            }),
        }
    }
}

/// One routing rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// When it applies.
    pub condition: Condition,
    /// Which instances it allows.
    pub targets: Vec<Target>,
    /// Its line in the source.
    pub line: usize,
}

/// One cookie-injection rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieRule {
    /// When it applies.
    pub condition: Condition,
    /// Cookies added to the call context.
    pub cookies: Vec<(String, String)>,
    /// Its line in the source.
    pub line: usize,
}

/// What routing sees of a call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallContext {
    /// Service name.
    pub service: String,
    /// Method name.
    pub method: String,
    /// Version the caller was built against; empty means none: every instance's version
    /// serves it (see [`compatible`](crate::version::compatible)).
    pub version: String,
    /// The end user's id.
    pub user_id: Option<i64>,
    /// The caller's ip.
    pub caller_ip: Option<Ipv4Addr>,
    /// The callee's ip (when known, e.g. a retry).
    pub callee_ip: Option<Ipv4Addr>,
    /// The end user's ip.
    pub user_ip: Option<Ipv4Addr>,
    /// Cookies (`cookie_<name>` IDs).
    pub cookies: HashMap<String, String>,
}

impl CallContext {
    /// The value of a rule ID as rules see it, if the call has one: an address is Dapeng's
    /// signed `int` of it (see the module docs). An owned copy; rule evaluation reads it in
    /// place instead.
    pub fn value(&self, id: &str) -> Option<String> {
        self.with_value(id, str::to_owned)
    }

    /// Runs `f` on the value of a rule ID, if the call has one, without allocating: text is
    /// borrowed, and numbers and addresses are formatted on the stack.
    fn with_value<R>(&self, id: &str, f: impl FnOnce(&str) -> R) -> Option<R> {
        self.with_value_and(id, &[], f)
    }

    /// [`with_value`](CallContext::with_value) as if `added` cookies (the later of two
    /// same-named ones winning) had been inserted into [`cookies`](CallContext::cookies).
    fn with_value_and<R>(
        &self,
        id: &str,
        added: &[(String, String)],
        f: impl FnOnce(&str) -> R,
    ) -> Option<R> {
        match id {
            "service" => Some(f(&self.service)),
            "method" => Some(f(&self.method)),
            // Empty: the caller named no version, and a missing value never matches.
            "version" if self.version.is_empty() => None,
            "version" => Some(f(&self.version)),
            "userId" => Some(formatted(self.user_id?, f)),
            // Dapeng holds addresses as Java `int`s, and rules see that number's text.
            "callerIp" => Some(formatted(java_int(self.caller_ip?), f)),
            "calleeIp" => Some(formatted(java_int(self.callee_ip?), f)),
            "userIp" => Some(formatted(java_int(self.user_ip?), f)),
            _ => id.strip_prefix("cookie_").and_then(|name| {
                let value = added
                    .iter()
                    .rev()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v)
                    .or_else(|| self.cookies.get(name))?;
                Some(f(value))
            }),
        }
    }
}

/// Runs `f` on `value` formatted into a stack buffer (a heap one only if it did not fit).
fn formatted<R>(value: impl std::fmt::Display, f: impl FnOnce(&str) -> R) -> R {
    // i64::MIN (20 characters) fits.
    let mut buf = [0u8; 24];
    let mut free = &mut buf[..];
    if write!(free, "{value}").is_ok() {
        let len = 24 - free.len();
        if let Ok(text) = std::str::from_utf8(&buf[..len]) {
            return f(text);
        }
    }
    f(&value.to_string())
}

impl Condition {
    /// Whether the matchers on the call's identity (`service`, `method`, `version`) hold;
    /// the others are not looked at. With [`holds_beyond_identity`](Condition::holds_beyond_identity)
    /// it splits [`holds_with`](Condition::holds_with), so the first part can be remembered
    /// per call identity.
    pub fn holds_on_identity(&self, ctx: &CallContext) -> bool {
        self.holds_where(ctx, &[], true)
    }

    /// Whether the matchers on anything but the call's identity hold, with `added` cookies.
    pub fn holds_beyond_identity(&self, ctx: &CallContext, added: &[(String, String)]) -> bool {
        self.holds_where(ctx, added, false)
    }

    /// Whether any matcher reads more than the call's identity.
    pub fn reads_beyond_identity(&self) -> bool {
        match self {
            Condition::Otherwise => false,
            Condition::All(matchers) => matchers.iter().any(|m| !is_identity(&m.id)),
        }
    }

    fn holds_where(&self, ctx: &CallContext, added: &[(String, String)], identity: bool) -> bool {
        match self {
            Condition::Otherwise => true,
            Condition::All(matchers) => matchers
                .iter()
                .filter(|m| is_identity(&m.id) == identity)
                .all(|m| m.holds(ctx, added)),
        }
    }

    /// Whether the call satisfies this condition.
    pub fn holds(&self, ctx: &CallContext) -> bool {
        self.holds_with(ctx, &[])
    }

    /// Whether the call satisfies this condition once `added` cookies are applied to it (as
    /// [`CookieRule::apply`] would), without copying the call.
    pub fn holds_with(&self, ctx: &CallContext, added: &[(String, String)]) -> bool {
        match self {
            Condition::Otherwise => true,
            Condition::All(matchers) => matchers.iter().all(|m| m.holds(ctx, added)),
        }
    }
}

/// Whether a rule ID names part of the call's identity (the same for every call of one
/// method of one service at one version).
fn is_identity(id: &str) -> bool {
    matches!(id, "service" | "method" | "version")
}

impl Matcher {
    /// Whether the ID has a value (with `added` cookies) that one of the patterns matches,
    /// no pattern before it having thrown in Dapeng's executor (see the module docs).
    fn holds(&self, ctx: &CallContext, added: &[(String, String)]) -> bool {
        self.outcome(ctx, added) == Ok(true)
    }

    fn outcome(&self, ctx: &CallContext, added: &[(String, String)]) -> Outcome {
        // Numbers and addresses are compared as such where every pattern can: formatting one
        // to text only to parse it back costs more than the rest of a pick.
        let number = match self.id.as_str() {
            "userId" => Some(ctx.user_id),
            "callerIp" => Some(ctx.caller_ip.map(java_int)),
            "calleeIp" => Some(ctx.callee_ip.map(java_int)),
            "userIp" => Some(ctx.user_ip.map(java_int)),
            _ => None,
        };
        if let Some(value) = number {
            // A missing value never matches, also under `~`.
            let Some(value) = value else {
                return Ok(false);
            };
            // As `first_decisive`, unless a pattern needing the text (`None`) comes first.
            match self
                .patterns
                .iter()
                .map(|p| p.on_number(value))
                .find(|o| *o != Some(Ok(false)))
            {
                None => return Ok(false),
                Some(Some(decisive)) => return decisive,
                Some(None) => {}
            }
        }
        ctx.with_value_and(&self.id, added, |v| {
            // Dapeng's executor: a blank value matches nothing, also under `~`.
            if java_blank(v) {
                return Ok(false);
            }
            first_decisive(self.patterns.iter().map(|p| p.on_text(v)))
        })
        .unwrap_or(Ok(false))
    }
}

/// The first route whose condition holds.
pub fn first_match<'r>(routes: &'r [Route], ctx: &CallContext) -> Option<&'r Route> {
    first_match_with(routes, ctx, &[])
}

/// The first route whose condition holds once `added` cookies are applied to the call (the
/// cookies of the call's first matching [`CookieRule`]).
pub fn first_match_with<'r>(
    routes: &'r [Route],
    ctx: &CallContext,
    added: &[(String, String)],
) -> Option<&'r Route> {
    routes.iter().find(|r| r.condition.holds_with(ctx, added))
}

/// The instances the routes allow for this call: all of them when no route matches; the
/// matching route's whitelist minus its blacklist otherwise (possibly none).
pub fn route<'i>(
    routes: &[Route],
    ctx: &CallContext,
    instances: &'i [Instance],
) -> Vec<&'i Instance> {
    match first_match(routes, ctx) {
        Some(rule) => instances.iter().filter(|i| rule.admits(i)).collect(),
        None => instances.iter().collect(),
    }
}

impl Route {
    /// Whether this rule lets a call reach `instance`: it matches no blacklist target, and
    /// for each kind of target (ip, version) one whitelist target of that kind, if the rule
    /// has any. Dapeng filters by ip targets, then by version targets: `ip'a', v'1.1.0'` is
    /// an instance at `a` running 1.1.0, not either.
    pub fn admits(&self, instance: &Instance) -> bool {
        // Per kind: `None` while the rule has no whitelist target of it.
        let (mut by_ip, mut by_version) = (None, None);
        for target in &self.targets {
            let whitelisted = match target {
                Target::Ip { .. } => &mut by_ip,
                Target::Version { .. } => &mut by_version,
            };
            match (target.negated(), target.matches(instance)) {
                (true, true) => return false,
                (false, matched) => *whitelisted = Some(whitelisted.unwrap_or(false) || matched),
                (true, false) => {}
            }
        }
        by_ip.unwrap_or(true) && by_version.unwrap_or(true)
    }
}

/// Adds the cookies of the first matching cookie rule to the context.
pub fn apply_cookies(rules: &[CookieRule], ctx: &mut CallContext) {
    if let Some(rule) = first_cookie_rule(rules, ctx) {
        rule.apply(ctx);
    }
}

/// The first cookie rule that can apply (see [`CookieRule::can_apply`]) whose condition holds
/// for the call.
pub fn first_cookie_rule<'r>(rules: &'r [CookieRule], ctx: &CallContext) -> Option<&'r CookieRule> {
    rules
        .iter()
        .find(|r| r.can_apply() && r.condition.holds(ctx))
}

impl CookieRule {
    /// False when two of its cookies share a name: Dapeng's executor fails on such a rule
    /// (collecting its cookies into a map) and tries the next one, and so does ours.
    pub fn can_apply(&self) -> bool {
        let cookies = &self.cookies;
        cookies
            .iter()
            .enumerate()
            .all(|(i, (name, _))| cookies[..i].iter().all(|(other, _)| other != name))
    }

    /// Adds this rule's cookies to the context (replacing same-named ones).
    pub fn apply(&self, ctx: &mut CallContext) {
        for (k, v) in &self.cookies {
            ctx.cookies.insert(k.clone(), v.clone());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Lexer

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Arrow,
    Semi,
    Comma,
    Tilde,
    Str(String),
    Regex(String),
    Ip(String),
    Modulo(String),
    Version(String),
    Cookie(String),
    Int(i64),
    Range(i64, i64),
    Newline,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
    column: usize,
}

fn error(line: usize, column: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        column,
        message: message.into(),
    }
}

fn lex(text: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    // Dapeng trims the node's text first (Java's `trim`: every character up to U+0020), so a
    // line end there swallows nothing; positions still count from the text's start.
    let end = chars
        .iter()
        .rposition(|c| *c > ' ')
        .map_or(0, |last| last + 1);
    let chars = &chars[..end];
    let first = chars.iter().position(|c| *c > ' ').unwrap_or(end);
    let (mut line, mut line_start) = past_line_ends(chars, 0..first, (1, 0));
    let mut i = first;
    while i < chars.len() {
        let c = chars[i];
        let column = i - line_start + 1;
        let push = |tokens: &mut Vec<Token>, tok| tokens.push(Token { tok, line, column });
        match c {
            // CRLF is one line end.
            '\r' if chars.get(i + 1) == Some(&'\n') => i += 1,
            '\n' | '\r' => {
                push(&mut tokens, Tok::Newline);
                // A lone CR ends a line too, and Dapeng's lexer, looking for its LF, also
                // consumes the character after it (which keeps its column).
                i += 1;
                line += 1;
                line_start = i;
                if c == '\r' {
                    i += 1;
                }
            }
            c if c.is_whitespace() => i += 1,
            '=' if chars.get(i + 1) == Some(&'>') => {
                push(&mut tokens, Tok::Arrow);
                i += 2;
            }
            ';' => {
                push(&mut tokens, Tok::Semi);
                i += 1;
            }
            ',' => {
                push(&mut tokens, Tok::Comma);
                i += 1;
            }
            '~' => {
                push(&mut tokens, Tok::Tilde);
                i += 1;
            }
            '\'' | '"' => {
                let (s, next) = quoted(chars, i, line, column)?;
                push(&mut tokens, Tok::Str(s));
                (line, line_start) = past_line_ends(chars, i..next, (line, line_start));
                i = next;
            }
            '%' if matches!(chars.get(i + 1), Some('\'' | '"')) => {
                let (s, next) = quoted(chars, i + 1, line, column)?;
                push(&mut tokens, Tok::Modulo(s));
                (line, line_start) = past_line_ends(chars, i..next, (line, line_start));
                i = next;
            }
            c if c.is_ascii_digit()
                || (matches!(c, '-' | '+')
                    && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                let (tok, next) = number(chars, i);
                push(&mut tokens, tok.map_err(|m| error(line, column, m))?);
                i = next;
            }
            // Java's `Character.isLetter` and `isDigit` (and `_`, and `.` after the first), as
            // Dapeng reads IDs: `cookie_user.id`.
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                if matches!(chars.get(i), Some('\'' | '"'))
                    && matches!(word.as_str(), "r" | "ip" | "v" | "c")
                {
                    let (s, next) = quoted(chars, i, line, column)?;
                    let tok = match word.as_str() {
                        "r" => Tok::Regex(s),
                        "ip" => Tok::Ip(s),
                        "v" => Tok::Version(s),
                        _ => Tok::Cookie(s),
                    };
                    push(&mut tokens, tok);
                    (line, line_start) = past_line_ends(chars, i..next, (line, line_start));
                    i = next;
                } else {
                    push(&mut tokens, Tok::Ident(word));
                }
            }
            other => {
                return Err(error(
                    line,
                    column,
                    format!("unexpected character {other:?}"),
                ))
            }
        }
    }
    Ok(tokens)
}

/// The text between the quote at `start` and the next one like it (which may be lines
/// further on, as Dapeng reads it), and the position after the closing quote. As in Dapeng,
/// the character after the opening quote belongs to the text whatever it is: `''` does not
/// close, and `'''` is the text `'`.
fn quoted(
    chars: &[char],
    start: usize,
    line: usize,
    column: usize,
) -> Result<(String, usize), ParseError> {
    let quote = chars[start];
    let mut s = String::new();
    for (i, c) in chars.iter().enumerate().skip(start + 1) {
        if *c == quote && i > start + 1 {
            return Ok((s, i + 1));
        }
        s.push(*c);
    }
    Err(error(
        line,
        column,
        format!("unterminated string: missing closing {quote}"),
    ))
}

/// The line and the start of the line after `span` (a quoted text, or the trimmed start),
/// which may hold line ends (LF, CRLF or a lone CR, as everywhere else).
fn past_line_ends(
    chars: &[char],
    span: std::ops::Range<usize>,
    (mut line, mut line_start): (usize, usize),
) -> (usize, usize) {
    for i in span {
        let ends_line = match chars[i] {
            '\n' => true,
            '\r' => chars.get(i + 1) != Some(&'\n'),
            _ => false,
        };
        if ends_line {
            line += 1;
            line_start = i + 1;
        }
    }
    (line, line_start)
}

/// A number or range at `start` (a sign or a digit) as Dapeng's `parserNumber` reads it:
/// every digit and `.` that follows; with `..` in it, the pieces between each `.` and the
/// character after it (Java's `split("\\..")`, trailing empty pieces dropped), of which the
/// first two are the bounds (`1..2.5` is 1..2); otherwise the whole is one number. Also
/// returns the position after it.
fn number(chars: &[char], start: usize) -> (Result<Tok, String>, usize) {
    let run = chars
        .get(start + 1..)
        .unwrap_or_default()
        .iter()
        .take_while(|c| c.is_ascii_digit() || **c == '.')
        .count();
    let end = start + 1 + run;
    let text: String = chars.get(start..end).unwrap_or_default().iter().collect();
    if !text.contains("..") {
        return (rule_long(&text).map(Tok::Int), end);
    }
    let mut pieces = vec![String::new()];
    let mut rest = text.chars();
    while let Some(c) = rest.next() {
        // A `.` and the character after it (consumed here) cut; a final `.` stays.
        if c == '.' && rest.next().is_some() {
            pieces.push(String::new());
        } else if let Some(piece) = pieces.last_mut() {
            piece.push(c);
        }
    }
    while pieces.last().is_some_and(String::is_empty) {
        pieces.pop();
    }
    let range = match pieces.as_slice() {
        [low, high, ..] => rule_long(low).and_then(|low| Ok(Tok::Range(low, rule_long(high)?))),
        _ => Err(format!("{text:?} is not a range N..M")),
    };
    (range, end)
}

// ---------------------------------------------------------------------------------------
// Parser

struct Parser<'t> {
    tokens: &'t [Token],
    pos: usize,
    end: (usize, usize),
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn here(&self) -> (usize, usize) {
        self.peek().map_or(self.end, |t| (t.line, t.column))
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        let (line, column) = self.here();
        Err(error(line, column, message))
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        if self.peek().is_some_and(|t| &t.tok == tok) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn condition(&mut self) -> Result<Condition, ParseError> {
        if matches!(self.peek(), Some(Token { tok: Tok::Ident(w), .. }) if w == "otherwise") {
            self.pos += 1;
            return Ok(Condition::Otherwise);
        }
        let mut matchers = vec![self.matcher()?];
        while self.eat(&Tok::Semi) {
            matchers.push(self.matcher()?);
        }
        Ok(Condition::All(matchers))
    }

    fn matcher(&mut self) -> Result<Matcher, ParseError> {
        let id = match self.next() {
            Some(Token {
                tok: Tok::Ident(id),
                ..
            }) if id != "match" => id,
            _ => {
                self.pos = self.pos.saturating_sub(1);
                return self.fail("expected an ID such as method, userId or cookie_<name>");
            }
        };
        match self.next() {
            Some(Token {
                tok: Tok::Ident(w), ..
            }) if w == "match" => {}
            _ => {
                self.pos -= 1;
                return self.fail(format!("expected 'match' after {id}"));
            }
        }
        let mut patterns = vec![self.pattern()?];
        while self.eat(&Tok::Comma) {
            patterns.push(self.pattern()?);
        }
        Ok(Matcher { id, patterns })
    }

    /// A pattern with its `~` prefix folded to parity (`~~p` is `p`), so any run of tildes
    /// nests at most one `Not`: parsing, matching and dropping stay within a fixed stack depth.
    fn pattern(&mut self) -> Result<Pattern, ParseError> {
        let mut negated = false;
        while self.eat(&Tok::Tilde) {
            negated = !negated;
        }
        let inner = self.plain_pattern()?;
        Ok(if negated {
            Pattern::Not(Box::new(inner))
        } else {
            inner
        })
    }

    fn plain_pattern(&mut self) -> Result<Pattern, ParseError> {
        let (line, column) = self.here();
        let at = |m: String| error(line, column, m);
        match self.next().map(|t| t.tok) {
            Some(Tok::Str(s)) => Ok(Pattern::Exact(s)),
            Some(Tok::Int(n)) => Ok(Pattern::Int(n)),
            Some(Tok::Range(a, b)) => Ok(Pattern::Range(a, b)),
            Some(Tok::Regex(source)) => {
                let invalid = |e: regex::Error| at(format!("invalid regex {source:?}: {e}"));
                // Checked alone first: wrapped, an unbalanced source such as `a)|(?:b` would
                // close the group itself and escape the whole-value anchors.
                let java = java_classes(&source);
                Regex::new(&java).map_err(invalid)?;
                let regex = Regex::new(&format!("^(?:{java})$")).map_err(invalid)?;
                Ok(Pattern::Regex(WholeRegex { source, regex }))
            }
            // Dapeng accepts a port here and ignores it.
            Some(Tok::Ip(s)) => {
                let net = match s.rsplit_once(':') {
                    Some((net, port)) if port.parse::<u16>().is_ok() => net,
                    _ => s.as_str(),
                };
                Ok(Pattern::Ip(IpNet::parse(net).map_err(at)?))
            }
            Some(Tok::Modulo(s)) => parse_modulo(&s).map_err(at),
            _ => {
                self.pos -= 1;
                self.fail("expected a pattern: 'text', r'regex', N, N..M, ip'a.b.c.d/m' or %'Bn+K'")
            }
        }
    }

    fn target(&mut self) -> Result<Target, ParseError> {
        let negated = self.eat(&Tok::Tilde);
        let (line, column) = self.here();
        let at = |m: String| error(line, column, m);
        match self.next().map(|t| t.tok) {
            Some(Tok::Ip(s)) => {
                let (net, port) = match s.rsplit_once(':') {
                    Some((net, port)) => (
                        net,
                        Some(
                            port.parse::<u16>()
                                .map_err(|_| at(format!("port {port:?} is not a number")))?,
                        ),
                    ),
                    None => (s.as_str(), None),
                };
                Ok(Target::Ip {
                    net: IpNet::parse(net).map_err(at)?,
                    port,
                    negated,
                })
            }
            Some(Tok::Version(version)) if !version.is_empty() => {
                Ok(Target::Version { version, negated })
            }
            _ => {
                self.pos -= 1;
                self.fail("expected a target: ip'a.b.c.d[/m][:port]' or v'1.0.0'")
            }
        }
    }

    fn cookie(&mut self) -> Result<(String, String), ParseError> {
        let (line, column) = self.here();
        match self.next().map(|t| t.tok) {
            // Dapeng's reading: one `#`, any name (also empty).
            Some(Tok::Cookie(s)) => match s.split_once('#') {
                Some((k, v)) if !v.contains('#') => Ok((k.to_owned(), v.to_owned())),
                _ => Err(error(
                    line,
                    column,
                    format!("cookie {s:?} must be key#value with one '#'"),
                )),
            },
            _ => {
                self.pos -= 1;
                self.fail("expected a cookie: c'key#value'")
            }
        }
    }

    fn end_of_line(&mut self) -> Result<(), ParseError> {
        match self.peek() {
            None => Ok(()),
            Some(Token {
                tok: Tok::Newline, ..
            }) => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => self.fail("expected ',' or the end of the line"),
        }
    }

    fn skip_blank_lines(&mut self) {
        while self.eat(&Tok::Newline) {}
    }

    fn rules<T>(
        &mut self,
        mut right: impl FnMut(&mut Self) -> Result<T, ParseError>,
    ) -> Result<Vec<(Condition, Vec<T>, usize)>, ParseError> {
        let mut out = Vec::new();
        self.skip_blank_lines();
        while self.peek().is_some() {
            let line = self.here().0;
            let condition = self.condition()?;
            if !self.eat(&Tok::Arrow) {
                return self.fail("expected '=>'");
            }
            let mut items = vec![right(self)?];
            while self.eat(&Tok::Comma) {
                items.push(right(self)?);
            }
            self.end_of_line()?;
            out.push((condition, items, line));
            self.skip_blank_lines();
        }
        Ok(out)
    }
}

/// `source` with the classes whose meaning Java and the regex crate do not share spelt as
/// Java's: `\d \D \w \W \s \S` and the POSIX ones (`\p{Alpha}`, `\P{Punct}`...) are ASCII-only
/// in Java and Unicode-aware in the crate, and Java's `\v \V` are vertical whitespace (the
/// crate's `\v` is one character). Bracketed, they also stand inside a class: `[\w-]` is
/// `[[0-9A-Za-z_]-]`, a nested class.
fn java_classes(source: &str) -> String {
    const POSIX: [(&str, &str); 13] = [
        ("Lower", "lower"),
        ("Upper", "upper"),
        ("ASCII", "ascii"),
        ("Alpha", "alpha"),
        ("Digit", "digit"),
        ("Alnum", "alnum"),
        ("Punct", "punct"),
        ("Graph", "graph"),
        ("Print", "print"),
        ("Blank", "blank"),
        ("Cntrl", "cntrl"),
        ("XDigit", "xdigit"),
        ("Space", "space"),
    ];
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..];
        let mut tail = escape.chars();
        tail.next();
        let Some(escaped) = tail.next() else {
            // A trailing backslash: left for the regex crate to refuse.
            out.push_str(escape);
            return out;
        };
        let after = tail.as_str();
        let class = match escaped {
            'd' => Some("[0-9]".to_owned()),
            'D' => Some("[^0-9]".to_owned()),
            'w' => Some("[0-9A-Za-z_]".to_owned()),
            'W' => Some("[^0-9A-Za-z_]".to_owned()),
            's' => Some(r"[\t\n\x0B\f\r ]".to_owned()),
            'S' => Some(r"[^\t\n\x0B\f\r ]".to_owned()),
            'v' => Some(r"[\n\x0B\f\r\x{85}\x{2028}\x{2029}]".to_owned()),
            'V' => Some(r"[^\n\x0B\f\r\x{85}\x{2028}\x{2029}]".to_owned()),
            'p' | 'P' => after.strip_prefix('{').and_then(|named| {
                let (name, _) = named.split_once('}')?;
                let (_, posix) = POSIX.iter().find(|(java, _)| *java == name)?;
                let negated = if escaped == 'P' { "^" } else { "" };
                Some(format!("[{negated}[:{posix}:]]"))
            }),
            _ => None,
        };
        match class {
            Some(class) => {
                out.push_str(&class);
                rest = match escaped {
                    // Past `{Name}` too.
                    'p' | 'P' => after.split_once('}').map_or("", |(_, r)| r),
                    _ => after,
                };
            }
            None => {
                // Any other escape (`\\` included) stays as written, both characters.
                let len = escape.len() - after.len();
                out.push_str(&escape[..len]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `%'Bn+K'` or `%'Bn+A..B'` as Dapeng's lexer reads it: its Java pattern
/// `([0-9]+)n\+(([0-9]+)..)?([0-9]+)`, matched whole, tries the range form first with the
/// longest low bound, and its `..` is any two characters but a line end.
fn parse_modulo(text: &str) -> Result<Pattern, String> {
    let bad = || format!("{text:?} is not Bn+K or Bn+A..B (digits only)");
    let digits = |s: &[char]| !s.is_empty() && s.iter().all(char::is_ascii_digit);
    let long = |s: &[char]| rule_long(&s.iter().collect::<String>());
    let (base, rest) = text.split_once("n+").ok_or_else(bad)?;
    let (base, rest): (Vec<char>, Vec<char>) = (base.chars().collect(), rest.chars().collect());
    if !digits(&base) {
        return Err(bad());
    }
    let base = long(&base)?;
    if base == 0 {
        return Err("modulus must not be 0".to_owned());
    }
    let java_dot = |c: &char| !matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}');
    let lead = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    let range = (1..=lead).rev().find(|&n| {
        rest.get(n..n + 2)
            .is_some_and(|sep| sep.iter().all(java_dot))
            && rest.get(n + 2..).is_some_and(digits)
    });
    let (low, high) = match range {
        Some(n) => (long(&rest[..n])?, long(&rest[n + 2..])?),
        None if digits(&rest) => {
            let k = long(&rest)?;
            (k, k)
        }
        None => return Err(bad()),
    };
    Ok(Pattern::Modulo { base, low, high })
}

fn parser<'t>(tokens: &'t [Token], text: &str) -> Parser<'t> {
    let lines = crate::error::text_lines(text).count().max(1);
    let last = crate::error::text_lines(text)
        .last()
        .map_or(0, |l| l.chars().count());
    Parser {
        tokens,
        pos: 0,
        end: (lines, last + 1),
    }
}

/// Parses routing rules; the error says where and what was expected.
pub fn parse_routes(text: &str) -> Result<Vec<Route>, ParseError> {
    let tokens = lex(text)?;
    let mut p = parser(&tokens, text);
    Ok(p.rules(Parser::target)?
        .into_iter()
        .map(|(condition, targets, line)| Route {
            condition,
            targets,
            line,
        })
        .collect())
}

/// Parses cookie-injection rules.
pub fn parse_cookie_rules(text: &str) -> Result<Vec<CookieRule>, ParseError> {
    let tokens = lex(text)?;
    let mut p = parser(&tokens, text);
    Ok(p.rules(Parser::cookie)?
        .into_iter()
        .map(|(condition, cookies, line)| CookieRule {
            condition,
            cookies,
            line,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Address;
    use registry_core::NodePath;

    /// Numbers and addresses compared as such decide exactly what matching their text does.
    #[test]
    fn typed_values_match_as_their_text_does() {
        let conditions = [
            "userId match 5",
            "userId match 1..10",
            "userId match %'4n+1'",
            "userId match %'1024n+2..4', 42",
            "userId match ~5",
            "userId match ~1..3, 7",
            "userId match '5'",
            "userId match r'4.*'",
            "userId match ip'10.0.0.0/8'",
            "callerIp match ip'10.0.0.0/8'",
            "callerIp match ~ip'10.1.0.0/16'",
            "callerIp match 5",
            "callerIp match '10.0.0.1'",
            "callerIp match '167772161'",
            "callerIp match r'-[0-9]+'",
            "callerIp match -1062731513..0",
            "userId match 1..3, ip'0.0.0.0/0'",
            "userId match ~ip'10.0.0.0/8', 5",
            "userIp match ip'192.168.1.0/24', ~ip'192.168.1.7'",
            "calleeIp match 1..9",
        ];
        let users = [
            None,
            Some(-5),
            Some(0),
            Some(5),
            Some(42),
            Some(1026),
            Some(i64::MIN),
        ];
        let ips: [Option<Ipv4Addr>; 4] = [
            None,
            Some([10, 0, 0, 1].into()),
            Some([10, 1, 2, 3].into()),
            Some([192, 168, 1, 7].into()),
        ];
        for text in conditions {
            let routes = parse_routes(&format!("{text} => ip'1.2.3.4'")).unwrap();
            let Condition::All(matchers) = &routes[0].condition else {
                panic!("{text}");
            };
            let matcher = &matchers[0];
            for user in users {
                for ip in ips {
                    let ctx = CallContext {
                        user_id: user,
                        caller_ip: ip,
                        callee_ip: ip,
                        user_ip: ip,
                        ..Default::default()
                    };
                    let by_text = ctx
                        .with_value(&matcher.id, |v| {
                            first_decisive(matcher.patterns.iter().map(|p| p.on_text(v)))
                        })
                        .unwrap_or(Ok(false));
                    assert_eq!(
                        matcher.outcome(&ctx, &[]),
                        by_text,
                        "{text} on {user:?} {ip:?}"
                    );
                }
            }
        }
    }

    fn inst(ip: &str, port: u16, version: &str) -> Instance {
        Instance {
            address: Address {
                ip: ip.parse().unwrap(),
                port,
            },
            version: Some(version.to_owned()),
            sequence: Some(0),
            weight: None,
            create_order: 1,
            path: NodePath::new(format!("/s/{ip}:{port}:{version}:0000000000")).unwrap(),
        }
    }

    /// Whether the left side `rule` holds for `c`.
    fn hold(rule: &str, c: &CallContext) -> bool {
        parse_routes(&format!("{rule} => ip'1.1.1.1'")).unwrap()[0]
            .condition
            .holds(c)
    }

    fn ctx(method: &str) -> CallContext {
        CallContext {
            service: "S".into(),
            method: method.into(),
            version: "1.0.0".into(),
            ..Default::default()
        }
    }

    fn routed(rules: &str, ctx: &CallContext, instances: &[Instance]) -> Vec<String> {
        let routes = parse_routes(rules).unwrap();
        route(&routes, ctx, instances)
            .iter()
            .map(|i| i.address.to_string())
            .collect()
    }

    #[test]
    fn notes_examples_parse() {
        let text = r#"method match 'getFoo','setFoo' ; version match '1.0.0' => ip'192.168.1.102', ~ip'192.168.1.101'
userId match %"1024n+2..4" => ip"192.168.1.101"
cookie_storeId match 11866600 => ip"192.168.1.101"
otherwise => ~ip"192.168.10.126"
otherwise => ip"192.168.1.101/24:9091""#;
        let routes = parse_routes(text).unwrap();
        assert_eq!(routes.len(), 5);
        assert_eq!(
            routes[1].condition,
            Condition::All(vec![Matcher {
                id: "userId".into(),
                patterns: vec![Pattern::Modulo {
                    base: 1024,
                    low: 2,
                    high: 4
                }]
            }])
        );
        assert_eq!(
            routes[4].targets,
            vec![Target::Ip {
                net: IpNet {
                    addr: [192, 168, 1, 101].into(),
                    prefix: 24
                },
                port: Some(9091),
                negated: false
            }]
        );
        let cookies = parse_cookie_rules(r#"cookie_storeId match 100720..101000 ; method match r"list.*" => c"thread-log-level#DEBUG""#).unwrap();
        assert_eq!(
            cookies[0].cookies,
            vec![("thread-log-level".into(), "DEBUG".into())]
        );
    }

    #[test]
    fn executor_semantics() {
        let all = [
            inst("192.168.1.101", 9090, "1.0.0"),
            inst("192.168.1.102", 9090, "1.0.0"),
            inst("192.168.1.103", 9091, "1.1.0"),
        ];
        let rules = "method match 'getFoo' => ip'192.168.1.102', ~ip'192.168.1.101'\nmethod match r'list.*' => ~ip'192.168.1.0/24:9090'\nmethod match 'v' => v'1.1.0'\nmethod match ~'other','x' => ip'10.0.0.1'";
        assert_eq!(routed(rules, &ctx("getFoo"), &all), ["192.168.1.102:9090"]);
        assert_eq!(routed(rules, &ctx("listAll"), &all), ["192.168.1.103:9091"]);
        assert_eq!(routed(rules, &ctx("v"), &all), ["192.168.1.103:9091"]);
        assert!(
            routed(rules, &ctx("nothing"), &all).is_empty(),
            "routing may exclude every instance"
        );
        assert_eq!(
            routed(rules, &ctx("other"), &all).len(),
            3,
            "no match: all instances"
        );
    }

    #[test]
    fn missing_values_never_match_even_negated() {
        let all = [inst("10.0.0.1", 1, "1.0.0")];
        let rules = "userId match ~5 => ~ip'10.0.0.1'\ncookie_x match ~'a' => ~ip'10.0.0.1'";
        assert_eq!(routed(rules, &ctx("m"), &all).len(), 1);
        let mut c = ctx("m");
        c.user_id = Some(6);
        assert!(routed(rules, &c, &all).is_empty());
        let mut c = ctx("m");
        c.cookies.insert("x".into(), "b".into());
        assert!(routed(rules, &c, &all).is_empty());
    }

    /// A caller that names no version has none: a `~` pattern on the version used to match it.
    #[test]
    fn an_empty_version_is_missing() {
        let mut c = ctx("m");
        c.version = String::new();
        assert!(!hold("version match ~'1.0.0'", &c));
        assert!(!hold("version match r'.*'", &c));
        c.version = "2.0.0".into();
        assert!(hold("version match ~'1.0.0'", &c));
    }

    /// Java's `\d`, `\w` and `\s` know ASCII only, inside classes too.
    #[test]
    fn regex_classes_are_javas_ascii_ones() {
        let matches = |regex: &str, value: &str| {
            let mut c = ctx("m");
            c.cookies.insert("x".into(), value.into());
            hold(&format!("cookie_x match r'{regex}'"), &c)
        };
        assert!(matches(r"\w+", "abc_19"));
        assert!(!matches(r"\w+", "张三"));
        assert!(matches(r"\W+", "张三"));
        assert!(matches(r"\d+", "0123"));
        assert!(!matches(r"\d+", "١٢"), "Arabic-Indic digits");
        assert!(matches(r"\D", "١"));
        assert!(matches(r"a\sb", "a\u{b}b"));
        assert!(!matches(r"a\sb", "a\u{3000}b"), "ideographic space");
        assert!(matches(r"\S+", "张"));
        assert!(matches(r"[\w-]+", "a-b_c"));
        assert!(!matches(r"[\w-]+", "a-张"));
        assert!(matches(r"[^\d]+", "ab"));
        assert!(!matches(r"[^\d]+", "a1"));
        assert!(matches(r"\\d", "\\d"), "an escaped backslash stays one");
        assert!(
            matches(r"\p{Han}+", "张三"),
            "Unicode classes asked for by name stay"
        );
        // Java's POSIX classes are ASCII, and its `\v` is vertical whitespace.
        assert!(matches(r"\p{Alpha}+", "abcXYZ"));
        assert!(!matches(r"\p{Alpha}+", "é"));
        assert!(matches(r"\P{Alpha}", "é"));
        assert!(matches(r"[\p{Digit}x]+", "12x"));
        assert!(!matches(r"\p{Lower}", "ß"));
        assert!(matches(r"\p{Punct}", "!"));
        assert!(matches(r"a\vb", "a\nb"));
        assert!(matches(r"a\vb", "a\u{2028}b"));
        assert!(!matches(r"a\Vb", "a\rb"));
    }

    /// Dapeng's Java regexes may ask for case-insensitive matching.
    #[test]
    fn regexes_may_ignore_case() {
        let routes = parse_routes("method match r'(?i)get.*' => ip'1.1.1.1'");
        let routes = routes.unwrap_or_else(|e| panic!("{e:?}"));
        assert!(routes[0].condition.holds(&ctx("GetUser")));
        assert!(!routes[0].condition.holds(&ctx("putUser")));
    }

    #[test]
    fn patterns() {
        let mut c = ctx("m");
        c.user_id = Some(1030);
        c.caller_ip = Some([192, 168, 5, 7].into());
        assert!(hold("userId match %'1024n+6'", &c));
        assert!(hold("userId match %'1024n+2..6'", &c));
        assert!(!hold("userId match %'1024n+7..9'", &c));
        assert!(hold("userId match 1000..1030", &c));
        assert!(!hold("userId match 1031..2000", &c));
        assert!(hold("callerIp match ip'192.168.0.0/16'", &c));
        assert!(!hold("callerIp match ip'192.168.4.0/24'", &c));
        assert!(hold("callerIp match ip'0.0.0.0/0'", &c));
        assert!(hold("callerIp match ip'192.168.5.7'", &c));
        assert!(
            !hold("method match r'm.+'", &c),
            "regex must match the whole value"
        );
        assert!(hold("userId match %'1024n+0..1023'", &c), "every remainder");
        assert!(hold("method match 'x', 'm' ; userId match 1030", &c));
        assert!(!hold("method match 'x', 'm' ; userId match 1", &c));
    }

    #[test]
    fn negated_regex_stands_in_for_java_look_ahead() {
        let error = parse_routes("method match r'(?!get).*' => ip'1.1.1.1'");
        assert_eq!(error.map_err(|e| (e.line, e.column)), Err((1, 14)));
        assert!(hold("method match ~r'get.*'", &ctx("listFoo")));
        assert!(!hold("method match ~r'get.*'", &ctx("getFoo")));
    }

    #[test]
    fn lines_end_at_a_lone_cr_too() {
        // Dapeng's lexer ends a line at '\r' as well as '\n', and a lone '\r' takes the
        // character after it along.
        let ids = |text: &str| {
            parse_routes(text)
                .unwrap()
                .iter()
                .map(|r| match &r.condition {
                    Condition::All(m) => m[0].id.clone(),
                    Condition::Otherwise => "otherwise".into(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids("otherwise => ip'1.1.1.1'\r\nmethod match 'a' => ip'2.2.2.2'\r\n"),
            ["otherwise", "method"]
        );
        assert_eq!(
            ids("otherwise => ip'1.1.1.1'\rmethod match 'a' => ip'2.2.2.2'"),
            ["otherwise", "ethod"]
        );
        assert_eq!(
            ids("otherwise => ip'1.1.1.1'\r method match 'a' => ip'2.2.2.2'\r"),
            ["otherwise", "method"]
        );
        let error = parse_routes("otherwise => ip'1.1.1.1'\r method 'a' => ip'2.2.2.2'");
        assert_eq!(error.map_err(|e| (e.line, e.column)), Err((2, 9)));
        // Dapeng trims the node first: a line end there swallows nothing.
        assert_eq!(ids("\r\u{1}method match 'a' => ip'2.2.2.2'\r"), ["method"]);
        assert_eq!(
            parse_routes("\n\n  method 'a' => v'1'").map_err(|e| (e.line, e.column)),
            Err((3, 10))
        );
        // Swallowed, the `o` of `otherwise` leaves an ID without `match`.
        assert!(parse_routes("method match 'a' => ip'1.1.1.1'\rotherwise => ip'2.2.2.2'").is_err());
    }

    /// Dapeng's pattern for `%'..'` takes `..` as any two characters.
    #[test]
    fn modulo_reads_as_dapengs_pattern_does() {
        let modulo = |text: &str| match parse_routes(&format!("userId match %'{text}' => v'1'")) {
            Ok(routes) => match &routes[0].condition {
                Condition::All(m) => match m[0].patterns[0] {
                    Pattern::Modulo { base, low, high } => Ok((base, low, high)),
                    _ => Err(String::new()),
                },
                Condition::Otherwise => Err(String::new()),
            },
            Err(e) => Err(e.message),
        };
        assert_eq!(modulo("1024n+6"), Ok((1024, 6, 6)));
        assert_eq!(modulo("1024n+100"), Ok((1024, 100, 100)));
        assert_eq!(modulo("1024n+2..4"), Ok((1024, 2, 4)));
        assert_eq!(modulo("1024n+10..200"), Ok((1024, 10, 200)));
        // Four digits or more: the middle two are Java's `..`.
        assert_eq!(modulo("1024n+1023"), Ok((1024, 1, 3)));
        assert_eq!(modulo("1024n+10000"), Ok((1024, 10, 0)));
        assert_eq!(modulo("1024n+2ab4"), Ok((1024, 2, 4)));
        // Parsed as written; they match what they can.
        assert_eq!(modulo("1024n+1024"), Ok((1024, 1, 4)));
        assert_eq!(modulo("100n+100"), Ok((100, 100, 100)));
        assert_eq!(modulo("4n+2..9"), Ok((4, 2, 9)));
        assert_eq!(modulo("4n+3..1"), Ok((4, 3, 1)));
        for bad in [
            "0n+1", " 4n+1", "4n+ 1", "4n+-1", "-4n+1", "4n+1..", "4n+", "n+1", "4n+1\n.2",
        ] {
            assert!(modulo(bad).is_err(), "{bad:?}");
        }
        let mut c = ctx("m");
        c.user_id = Some(2049);
        assert!(
            hold("userId match %'1024n+1023'", &c),
            "2049 mod 1024 is 1, in 1..3"
        );
        assert!(hold("userId match %'4n+0..9'", &c));
        assert!(!hold("userId match %'4n+3..1'", &c));
    }

    /// What Dapeng's lexer accepts beyond the notes' grammar, read as it reads it.
    #[test]
    fn dapengs_leniencies_parse_as_dapeng_reads_them() {
        let net = |text: &str| IpNet::parse(text).map(|n| n.prefix);
        assert_eq!(net("1.2.3.4"), Ok(32));
        assert_eq!(net("1.2.3.4/8"), Ok(8));
        assert_eq!(net("1.2.3.4/08"), Ok(8));
        assert_eq!(net("1.2.3.4/24"), Ok(24));
        assert_eq!(net("1.2.3.4/0"), Ok(0));
        // Java shifts by `32 - mask` mod 32.
        assert_eq!(net("1.2.3.4/00"), Ok(32));
        assert_eq!(net("1.2.3.4/33"), Ok(1));
        assert_eq!(net("1.2.3.4/40"), Ok(8));
        assert_eq!(net("1.2.3.4/99"), Ok(3));
        assert!(net("1.2.3.4/100").is_err());

        let mut c = ctx("m");
        c.user_id = Some(5);
        c.caller_ip = Some([192, 168, 5, 7].into());
        c.cookies.insert("门店".into(), "x".into());
        assert!(
            hold("callerIp match ip'192.168.5.7:9090'", &c),
            "the port is ignored"
        );
        assert!(hold("userId match +5", &c));
        assert!(hold("userId match +1..9", &c));
        assert!(
            !hold("userId match 9..2", &c),
            "an empty range parses and matches nothing"
        );
        assert!(hold("cookie_门店 match 'x'", &c));
        let spanning = parse_routes("method match 'x\nm' => v'1'").unwrap();
        assert_eq!(
            spanning[0].condition,
            Condition::All(vec![Matcher {
                id: "method".into(),
                patterns: vec![Pattern::Exact("x\nm".into())]
            }]),
            "a text may span lines"
        );
        // The character after an opening quote is text: `'''` is `'`, and `''` does not close.
        let mut quote = ctx("m");
        quote.cookies.insert("q".into(), "'".into());
        assert!(hold("cookie_q match '''", &quote));
        assert!(parse_routes("method match '' => v'1'").is_err());
        // IDs may hold dots after their first character.
        let mut dotted = ctx("m");
        dotted.cookies.insert("user.id".into(), "5".into());
        assert!(hold("cookie_user.id match 5", &dotted));
        // Numbers: every digit and dot after a sign or digit, split as Java's `split("\\..")`.
        let range = |text: &str| {
            parse_routes(&format!("userId match {text} => v'1'")).map(|r| match &r[0].condition {
                Condition::All(m) => m[0].patterns[0].clone(),
                Condition::Otherwise => Pattern::Int(0),
            })
        };
        assert_eq!(range("1..2.5"), Ok(Pattern::Range(1, 2)));
        assert_eq!(range("1..2..3"), Ok(Pattern::Range(1, 2)));
        assert_eq!(range("-3..7"), Ok(Pattern::Range(-3, 7)));
        for bad in ["1..+5", "-5..-1", "1...5", "1..", "1.5", "1..5."] {
            assert!(range(bad).is_err(), "{bad}");
        }

        let cookies = parse_cookie_rules("otherwise => c'#v'").unwrap();
        assert_eq!(cookies[0].cookies, vec![(String::new(), "v".into())]);
        assert!(parse_cookie_rules("otherwise => c'a#b#c'").is_err());
    }

    #[test]
    fn errors_have_positions() {
        let cases = [
            ("method 'x' => ip'1.1.1.1'", (1, 8), "'match'"),
            ("method match 'x' ip'1.1.1.1'", (1, 18), "'=>'"),
            ("otherwise => ip'1.1.1.1/333'", (1, 14), "mask"),
            (
                "method match 'a\nb' ; userId match r'(' => ip'1.1.1.1'",
                (2, 19),
                "regex",
            ),
            (
                "otherwise => ip'1.1.1.1'\nmethod match r'(' => ip'1.1.1.1'",
                (2, 14),
                "regex",
            ),
            (
                "otherwise => ip'1.1.1.1'\n\nuserId match %'0n+1' => v'1'",
                (3, 14),
                "modulus",
            ),
            ("otherwise => ip'1.1.1.1", (1, 14), "unterminated"),
            ("method match 'x => ip'1.1.1.1'", (1, 23), "integer"),
            ("userId match %'1024n+-1' => v'1'", (1, 14), "digits only"),
            ("userId match %'4n+-1..2' => v'1'", (1, 14), "digits only"),
            ("otherwise => v'1' v'2'", (1, 19), "end of the line"),
            ("otherwise =>", (1, 13), "target"),
            ("method match $ => v'1'", (1, 14), "unexpected character"),
            // Wrapped as `^(?:a)|(?:b)$` it would parse, and match "axyz".
            ("method match r'a)|(?:b' => v'1'", (1, 14), "regex"),
        ];
        for (text, (line, column), needle) in cases {
            let e = parse_routes(text).unwrap_err();
            assert_eq!((e.line, e.column), (line, column), "{text:?}: {e}");
            assert!(e.message.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn tilde_runs_fold_to_parity() {
        let one = |rule: &str| match parse_routes(&format!("{rule} => v'1'")).unwrap()[0]
            .condition
            .clone()
        {
            Condition::All(mut m) => m.remove(0).patterns.remove(0),
            Condition::Otherwise => unreachable!(),
        };
        let five = Pattern::Int(5);
        assert_eq!(one("userId match ~5"), Pattern::Not(Box::new(five.clone())));
        assert_eq!(one("userId match ~~5"), five);
        assert_eq!(one("userId match ~ ~ ~5"), Pattern::Not(Box::new(five)));
        let mut c = ctx("m");
        c.user_id = Some(5);
        for (tildes, holds) in [(1, false), (2, true), (3, false)] {
            let text = format!("userId match {}5 => v'1'", "~".repeat(tildes));
            let routes = parse_routes(&text).unwrap();
            assert_eq!(routes[0].condition.holds(&c), holds, "{tildes} tildes");
        }
    }

    #[test]
    fn long_tilde_run_parses_in_bounded_stack() {
        // The old parser recursed once per `~` (and so did matching and Drop): this aborted
        // the process with a stack overflow.
        let handle = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let text = format!("userId match {}1 => v'1'", "~".repeat(100_000));
                let routes = parse_routes(&text).unwrap();
                let mut c = ctx("m");
                c.user_id = Some(1);
                let held = routes[0].condition.holds(&c);
                let odd = format!("userId match {}1 => v'1'", "~".repeat(100_001));
                (held, parse_routes(&odd).unwrap()[0].condition.holds(&c))
            })
            .unwrap();
        assert_eq!(handle.join().unwrap(), (true, false));
    }

    #[test]
    fn modulo_of_a_negative_user_id_is_javas_remainder_as_in_dapeng() {
        let mut c = ctx("m");
        // Euclidean: -1018 is 6 mod 1024 and -5 is 3 mod 4. Java (Dapeng): -1018 and -1.
        c.user_id = Some(-1018);
        assert!(!hold("userId match %'1024n+6'", &c));
        assert!(!hold("userId match %'1024n+0..1023'", &c));
        assert!(hold("userId match ~%'1024n+0..1023'", &c));
        c.user_id = Some(-5);
        assert!(!hold("userId match %'4n+3'", &c));
        c.user_id = Some(-1024);
        assert!(hold("userId match %'1024n+0'", &c), "-1024 % 1024 is 0");
    }

    #[test]
    fn hand_built_modulo_with_an_impossible_base_matches_nothing() {
        let modulo = |base| Pattern::Modulo {
            base,
            low: 0,
            high: 0,
        };
        assert!(!modulo(0).matches("5"), "base 0");
        assert!(
            !modulo(-1).matches(&i64::MIN.to_string()),
            "base -1, i64::MIN"
        );
        assert!(modulo(-1).matches("5"), "5 mod -1 is 0");
    }

    #[test]
    fn ip_net_with_a_prefix_over_32_does_not_panic() {
        let net = IpNet {
            addr: [10, 0, 0, 1].into(),
            prefix: 40,
        };
        assert!(net.contains([10, 0, 0, 1].into()));
        assert!(!net.contains([10, 0, 0, 2].into()));
    }

    #[test]
    fn cookie_rules_apply_first_match() {
        let rules =
            parse_cookie_rules("method match 'a' => c'k#1', c'j#2'\notherwise => c'k#3'").unwrap();
        let mut c = ctx("a");
        apply_cookies(&rules, &mut c);
        assert_eq!(c.cookies.get("k").map(String::as_str), Some("1"));
        assert_eq!(c.cookies.get("j").map(String::as_str), Some("2"));
        let mut c = ctx("b");
        apply_cookies(&rules, &mut c);
        assert_eq!(c.cookies.get("k").map(String::as_str), Some("3"));
    }

    fn with_cookie(name: &str, value: &str) -> CallContext {
        let mut c = ctx("m");
        c.cookies.insert(name.into(), value.into());
        c
    }

    /// Dapeng holds addresses as Java `int`s (`IPUtils.transferIp`), and its rules read
    /// `callerIp` as that number's text.
    #[test]
    fn addresses_read_as_javas_signed_int() {
        let c = CallContext {
            caller_ip: Some([192, 168, 10, 130].into()),
            ..ctx("m")
        };
        assert_eq!(c.value("callerIp").as_deref(), Some("-1062729086"));
        assert!(hold("callerIp match '-1062729086'", &c));
        assert!(hold("callerIp match -1062729086", &c));
        assert!(hold("callerIp match ip'192.168.10.0/24'", &c));
        assert!(!hold("callerIp match '192.168.10.130'", &c));
        assert!(!hold("callerIp match r'192\\..*'", &c));
        // A cookie holding an address is text: an `ip'..'` pattern reads only the number.
        assert!(hold(
            "cookie_ip match ip'10.0.0.0/8'",
            &with_cookie("ip", "167838211")
        ));
    }

    /// Where Dapeng's executor throws (a range or an address pattern on a value that is no
    /// number) it skips the rule: also under `~`, and whatever alternatives follow.
    #[test]
    fn a_range_or_address_pattern_on_a_non_number_skips_the_rule() {
        let abc = with_cookie("x", "abc");
        assert!(!hold("cookie_x match ~1..5", &abc));
        assert!(!hold("cookie_x match 1..5, 'abc'", &abc));
        assert!(hold("cookie_x match 'abc', 1..5", &abc));
        assert!(!hold("cookie_x match ~ip'10.0.0.0/8'", &abc));
        assert!(!hold(
            "cookie_ip match ip'10.0.0.0/8'",
            &with_cookie("ip", "10.1.2.3")
        ));
        // A number or `%` pattern catches it: no match, and `~` turns that into one.
        assert!(hold("cookie_x match ~7", &abc));
        assert!(hold("cookie_x match ~%'4n+1'", &abc));
        // Java's `Long.parseLong` takes no spaces around the number.
        assert!(!hold("cookie_x match ~1..5", &with_cookie("x", " 3")));
        assert!(hold("cookie_x match 1..5", &with_cookie("x", "+3")));
        // A skipped rule is no match: the next rule decides.
        let instances = [inst("10.0.0.1", 1, "1.0.0"), inst("10.0.0.2", 1, "1.0.0")];
        assert_eq!(
            routed(
                "cookie_x match ~1..5 => ip'10.0.0.1'\notherwise => ip'10.0.0.2'",
                &abc,
                &instances
            ),
            vec!["10.0.0.2:1"]
        );
    }

    /// Dapeng's `matcherPattern` takes a value that `trim`s to nothing as no value.
    #[test]
    fn blank_values_are_missing_even_negated() {
        for blank in ["", " ", "\t ", "\u{1}"] {
            let c = with_cookie("x", blank);
            assert!(!hold("cookie_x match ~'a'", &c), "{blank:?}");
            assert!(!hold("cookie_x match r'.*'", &c), "{blank:?}");
        }
        assert!(hold("cookie_x match ~'a'", &with_cookie("x", " b")));
        assert!(!hold("method match ~'a'", &ctx("  ")));
    }

    /// Dapeng filters by a route's ip targets, then by its version targets.
    #[test]
    fn ip_and_version_targets_must_both_hold() {
        let instances = [
            inst("192.168.1.101", 1, "1.0.0"),
            inst("192.168.1.101", 2, "1.1.0"),
            inst("192.168.1.102", 3, "1.1.0"),
        ];
        let c = ctx("m");
        assert_eq!(
            routed("otherwise => ip'192.168.1.101', v'1.1.0'", &c, &instances),
            vec!["192.168.1.101:2"]
        );
        assert_eq!(
            routed(
                "otherwise => ip'192.168.1.101', ip'192.168.1.102', v'1.1.0'",
                &c,
                &instances
            ),
            vec!["192.168.1.101:2", "192.168.1.102:3"]
        );
        assert_eq!(
            routed("otherwise => ~ip'192.168.1.102', v'1.1.0'", &c, &instances),
            vec!["192.168.1.101:2"]
        );
        assert_eq!(
            routed("otherwise => ip'192.168.1.101', ~v'1.0.0'", &c, &instances),
            vec!["192.168.1.101:2"]
        );
    }

    /// Dapeng compares version targets with `equalsIgnoreCase`.
    #[test]
    fn version_targets_ignore_case() {
        let instances = [
            inst("10.0.0.1", 1, "1.0.0-SNAPSHOT"),
            inst("10.0.0.2", 1, "1.0.0"),
        ];
        let c = ctx("m");
        assert_eq!(
            routed("otherwise => v'1.0.0-snapshot'", &c, &instances),
            vec!["10.0.0.1:1"]
        );
        assert_eq!(
            routed("otherwise => ~v'1.0.0-Snapshot'", &c, &instances),
            vec!["10.0.0.2:1"]
        );
    }

    /// Dapeng's cookie executor fails on a rule naming one cookie twice and tries the next.
    #[test]
    fn a_cookie_rule_naming_a_cookie_twice_is_skipped() {
        let rules =
            parse_cookie_rules("method match 'a' => c'k#1', c'k#2'\notherwise => c'k#3'").unwrap();
        assert!(!rules[0].can_apply());
        assert!(rules[1].can_apply());
        let mut c = ctx("a");
        apply_cookies(&rules, &mut c);
        assert_eq!(c.cookies.get("k").map(String::as_str), Some("3"));
    }
}
