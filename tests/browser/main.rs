//! The screens in a real browser: five real `kizuna run` nodes on loopback
//! (hq, two shelters, an ambulance and a clinic; card readers on vpcd slots
//! 0 and 1 fed by `kizuna-card-emu`), driven in one headless Chromium
//! through WebDriver. One test, one browser, steps in order (each step
//! builds on the mesh state the previous ones left):
//!
//! 1. sign-in: refusals, a staff card tap plus PIN;
//! 2. a resident card tap opens the household, check-in, the hq dashboard
//!    (open in another tab) updates without a reload: occupancy against
//!    capacity, arrivals chart, last sync and staleness, a district's
//!    unaccounted residents, the family-mail outbox (a relay on loopback
//!    that sends, refuses and cuts), mesh health with a revoked tablet,
//!    find a person; a second tap does nothing twice;
//! 3. cardless search, registration, the roster and its print view (print
//!    media emulated: no navigation or buttons, A4; saved as a PDF);
//! 4. script-injection payloads in every text field render as text;
//! 5. the shelter cannot read medical profiles;
//! 6. ambulance: tap, reason, profile, the printed handover (the profile
//!    alone, one page, saved as a PDF); break-glass flagged and reviewed at hq;
//! 7. clinic: profile editing and the eligibility view;
//! 8. a partition: hq down, the same person checked in at both shelters,
//!    the conflict shown at hq and on the roster after hq returns; a
//!    shelter cut off shown at hq;
//! 9. session, CSRF, Origin and Host refusals with the browser's cookie;
//!    sessions end when the operator is removed or rotated;
//! 10. phone and desktop sizes, the English switch; keyboard only: a desk
//!    check-in with Tab, Shift+Tab, Enter and Space, the focus visible at
//!    every stop;
//! 11. a password with a one-time code, sign-out; 12. transfer, check-out.
//!
//! Screenshots of every screen, and the printed roster and handover as
//! PDFs, go to `target/screenshots/` (screenshots also to
//! `docs/screenshots/` with `KIZUNA_UPDATE_DOCS=1`). Needs Debian's
//! `chromium`, `chromium-driver`, `fonts-noto-cjk`, pcscd and vpcd
//! (deploy/scripts/setup.sh). It uses the machine's one virtual card
//! reader, so it must not run beside another card test suite.

mod harness;
mod tools;

use anyhow::{bail, Context, Result};
use harness::*;
use serde_json::json;
use tools::*;

const STAFF: &str = "5555555555555";
const CARD_A: &str = "4000000000001";
const CARD_B: &str = "4000000000002";
const CARD_C: &str = "4000000000003";
const PIN: &str = "2468";
const PASSWORD: &str = "desk-password-01";

/// Markup and script in many shapes: each, if it ever became markup, would
/// leave an element with `data-xss` or set `window.__xss`.
const PAYLOADS: &[&str] = &[
    "<img src=x onerror=\"window.__xss=1\" data-xss>",
    "<script>window.__xss=1</script>",
    "\"><svg onload=\"window.__xss=1\" data-xss>",
    "'><b data-xss>bold</b>",
    "<iframe srcdoc=\"<script>parent.__xss=1</script>\" data-xss></iframe>",
    "javascript:window.__xss=1",
    "<a href=\"javascript:window.__xss=1\" data-xss>link</a>",
    "{{constructor.constructor('window.__xss=1')()}}",
    "<details open ontoggle=\"window.__xss=1\" data-xss>",
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__xss=1 data-xss>",
    "<style>*{display:none}</style><i data-xss>",
    "<input autofocus onfocus=\"window.__xss=1\" data-xss>",
    "<body onload=\"window.__xss=1\" data-xss>",
    "<video><source onerror=\"window.__xss=1\" data-xss>",
    "<object data=\"javascript:window.__xss=1\" data-xss>",
    "</bdi></td><b data-xss>",
    "&lt;b data-xss&gt;",
    "<marquee onstart=\"window.__xss=1\" data-xss>",
    "<meta http-equiv=\"refresh\" content=\"0;url=javascript:window.__xss=1\" data-xss>",
    "%3Cscript%3Ewindow.__xss=1%3C/script%3E",
    "<noscript><p title=\"</noscript><img src=x onerror=window.__xss=1 data-xss>\">",
    "葛\u{E0100}城 <b data-xss>",
    "'';!--\"<XSS data-xss>=&{()}",
    "<template><b data-xss></template><b data-xss>",
];

fn registry() -> String {
    let mut csv =
        String::from("household_id,address,person_id,name,kana,birth_date,card_user_id\n");
    for (h, addr, p, name, kana, birth, card) in [
        (
            "hx1",
            "新潟県三条市旭町1-1",
            "px1",
            "山田 太郎",
            "ヤマダ タロウ",
            "1950-04-01",
            CARD_A,
        ),
        (
            "hx1",
            "新潟県三条市旭町1-1",
            "px2",
            "山田 花子",
            "ヤマダ ハナコ",
            "1952-05-02",
            "",
        ),
        (
            "hx1",
            "新潟県三条市旭町1-1",
            "px3",
            "山田 一郎",
            "ヤマダ イチロウ",
            "1980-06-03",
            "",
        ),
        (
            "hx2",
            "新潟県三条市本町2-2",
            "px4",
            "佐藤 健太",
            "サトウ ケンタ",
            "1961-07-04",
            CARD_B,
        ),
        (
            "hx3",
            "新潟県三条市荒町3-3",
            "px5",
            "鈴木 三郎",
            "スズキ サブロウ",
            "1990-02-03",
            CARD_C,
        ),
        (
            "hx4",
            "新潟県三条市月岡4-4",
            "px6",
            "高橋 陽子",
            "タカハシ ヨウコ",
            "1975-08-05",
            "",
        ),
        (
            "hx5",
            "新潟県三条市東裏館5-5",
            "px7",
            "伊藤 誠",
            "イトウ マコト",
            "1948-09-06",
            "",
        ),
    ] {
        csv.push_str(&format!("{h},{addr},{p},{name},{kana},{birth},{card}\n"));
    }
    // A few hundred more residents for the dashboard's districts.
    let more = node::demo::synthetic_registry(80, 5);
    for line in more.lines().skip(1) {
        csv.push_str(line);
        csv.push('\n');
    }
    csv
}

async fn sign_in_link(b: &Browser, n: &NodeProc, operator: &str) -> Result<()> {
    b.c.goto(&n.link(operator)?).await?;
    b.wait_js(
        "the signed-in screen",
        "return document.body.dataset.csrf && document.body.dataset.screen !== 'login';",
    )
    .await?;
    Ok(())
}

#[test]
fn screens_in_chromium() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if let Err(e) = run().await {
            panic!("{e:#}");
        }
    });
}

async fn run() -> Result<()> {
    card_stack_start()?;
    use crdt::Role::*;
    let specs = [
        NodeSpec {
            id: "hq-1",
            role: Hq,
            card_slot: None,
        },
        NodeSpec {
            id: "shelter-01",
            role: Shelter,
            card_slot: Some(0),
        },
        NodeSpec {
            id: "shelter-02",
            role: Shelter,
            card_slot: None,
        },
        NodeSpec {
            id: "ambulance-1",
            role: Ambulance,
            card_slot: Some(1),
        },
        NodeSpec {
            id: "clinic-1",
            role: Clinic,
            card_slot: None,
        },
    ];
    // Setup writes through blocking engine calls: off the async workers.
    let mut mesh = tokio::task::block_in_place(|| {
        Mesh::create(
            &specs,
            &registry(),
            &[("shelter-01", "三条小学校"), ("shelter-02", "大島中学校")],
        )
    })?;
    // Operators: a password for the desk, a staff card with a PIN, second
    // operators on the medical nodes for the payload rounds.
    {
        let s1 = mesh.node("shelter-01");
        let d = s1.data();
        let d = d.to_str().unwrap();
        kizuna(
            &["operator", "password", "--data-dir", d, "--name", "desk"],
            &format!("{PASSWORD}\n"),
        )?;
        kizuna(
            &[
                "operator",
                "add",
                "--data-dir",
                d,
                "--name",
                "staff-1",
                "--card",
                STAFF,
            ],
            "",
        )?;
        kizuna(
            &["operator", "pin", "--data-dir", d, "--name", "staff-1"],
            &format!("{PIN}\n"),
        )?;
        mesh.node("ambulance-1").add_operator("crew-2", None)?;
        mesh.node("clinic-1").add_operator("nurse-2", None)?;
        mesh.node("shelter-02")
            .add_operator("desk-2", Some(PASSWORD))?;
    }
    // Headquarters sends family mail through a relay on loopback.
    let relay = FakeSmtp::start()?;
    {
        let hq = mesh.node("hq-1");
        let mut cfg = std::fs::read_to_string(&hq.config)?;
        cfg.push_str(&relay.config());
        std::fs::write(&hq.config, cfg)?;
    }
    for n in mesh.nodes.iter_mut() {
        n.start()?;
    }
    // Profiles and eligibility written at hq, as the municipality would.
    let hq = mesh.node("hq-1");
    let (s, r) = hq.api(
        "POST",
        "/api/v1/persons/px4/medical",
        Some(json!({"blood_type": "A+", "consent": "consented", "add": [
            ["allergy", "ペニシリン / penicillin"], ["condition", "高血圧 / hypertension"],
            ["medication", "アムロジピン 5mg"], ["family_doctor", "三条内科医院 0256-00-0000"],
            ["emergency_contact", "佐藤 花子（妻）090-0000-0000"]]})),
    )?;
    anyhow::ensure!(s == 201, "medical px4: {s} {r}");
    let (s, r) = hq.api(
        "POST",
        "/api/v1/persons/px5/medical",
        Some(json!({"blood_type": "O-", "add": [["allergy", "造影剤 / contrast medium"]]})),
    )?;
    anyhow::ensure!(s == 201, "medical px5: {s} {r}");
    let (s, r) = hq.api(
        "PUT",
        "/api/v1/persons/px4/eligibility",
        Some(
            json!({"insurer_number": "154211", "insurer": "三条市国民健康保険", "symbol": "三条",
                    "number": "1234567", "valid_from": "2025-04-01", "valid_to": "2099-03-31",
                    "copay_pct": 30, "as_of": "2026-11-01"}),
        ),
    )?;
    anyhow::ensure!(s == 201, "eligibility: {s} {r}");
    // 山田 太郎's family, one contact for each way a mail can end: sent,
    // refused for good, refused for now (retried), and sent without an
    // acknowledgement (indeterminate).
    let contacts: Vec<_> = ["ok", "fail", "later", "cut"]
        .iter()
        .enumerate()
        .map(|(i, k)| {
            json!({"contact_id": format!("c{i}"), "name": format!("山田 家族{i}"),
                   "email": format!("family{i}+{k}@example.org"), "consent": true})
        })
        .collect();
    let (s, r) = hq.api(
        "PUT",
        "/api/v1/persons/px1/contacts",
        Some(json!({"contacts": contacts, "disclosure": {"do_not_disclose": false, "share_shelter": true}})),
    )?;
    anyhow::ensure!(s == 201, "contacts px1: {s} {r}");
    // Every node has the registry and the profiles it may hold.
    for id in ["shelter-01", "shelter-02", "ambulance-1", "clinic-1"] {
        let n = mesh.node(id);
        wait_for(&format!("{id} to receive the registry"), || {
            let (s, v) = n
                .api("GET", "/api/v1/search?q=%E3%82%A4%E3%83%88%E3%82%A6", None)
                .ok()?;
            (s == 200 && v.as_array().is_some_and(|a| !a.is_empty())).then_some(())
        })?;
    }

    let b = Browser::start().await?;
    let result = steps(&b, &mut mesh).await;
    if result.is_err() {
        let _ = b.screenshot("failure").await;
    }
    b.close().await;
    result?;
    // No card ID ever reached a node's log.
    for n in &mesh.nodes {
        let log = std::fs::read_to_string(n.log()).unwrap_or_default();
        for id in [STAFF, CARD_A, CARD_B, CARD_C] {
            anyhow::ensure!(!log.contains(id), "card id {id} in {}'s log", n.id);
        }
    }
    Ok(())
}

async fn steps(b: &Browser, mesh: &mut Mesh) -> Result<()> {
    sign_in(b, mesh).await.context("1 sign-in")?;
    let hq_window = tap_and_check_in(b, mesh)
        .await
        .context("2 tap and check-in")?;
    cardless(b, mesh).await.context("3 cardless and roster")?;
    payloads_shelter(b, mesh)
        .await
        .context("4 payloads at the shelter")?;
    shelter_no_medical(b, mesh)
        .await
        .context("5 shelter and medical data")?;
    ambulance(b, mesh, &hq_window)
        .await
        .context("6 ambulance")?;
    clinic(b, mesh).await.context("7 clinic")?;
    partition(b, mesh, &hq_window)
        .await
        .context("8 partition")?;
    refusals(b, mesh).await.context("9 refusals")?;
    sizes_and_language(b, mesh, &hq_window)
        .await
        .context("10 sizes and language")?;
    keyboard_only(b, mesh).await.context("10b keyboard only")?;
    second_factor_and_logout(b, mesh)
        .await
        .context("11 password with a one-time code, and sign-out")?;
    transfer_and_checkout(b, mesh)
        .await
        .context("12 transfer and check-out")?;
    Ok(())
}

/// Waits for `person` among the search results and opens them.
async fn open_found(b: &Browser, person: &str) -> Result<()> {
    let button = format!("#search-results li[data-person={person}] button");
    b.c.execute("window.__found = arguments[0];", vec![json!(button)])
        .await?;
    b.wait_js("found", "return document.querySelector(window.__found);")
        .await?;
    b.click(&button).await
}

/// A desk task with the keyboard alone (WebDriver key actions, no
/// clicks), from the top of a fresh page: Tab to the search, type the kana,
/// Enter; Tab to the result, Enter; Space unticks the person, the check-in
/// refuses with nobody ticked; Shift+Tab back, Space ticks them again, Tab
/// to the check-in and Space. Every stop of the focus shows it without
/// relying on colour, and after the check-in the focus is where it was.
async fn keyboard_only(b: &Browser, mesh: &mut Mesh) -> Result<()> {
    use fantoccini::key::Key;
    let s1 = mesh.node("shelter-01");
    b.c.goto(&format!("{}/ui/", s1.base())).await?;
    b.wait_js(
        "the desk",
        "return document.body.dataset.screen === 'shelter' && document.querySelectorAll('#roster tbody tr').length > 0;",
    )
    .await?;
    let (s, v) = s1.api("GET", "/api/v1/persons/px6", None)?;
    anyhow::ensure!(s == 200 && v["location"].is_null(), "px6 before: {s} {v}");
    b.tab_to("#q", false, 30).await?;
    let mut typed: Vec<char> = "タカハシ ヨウコ".chars().collect();
    typed.push(key(Key::Enter));
    b.keys(&typed).await?;
    b.wait_js(
        "the result",
        "return document.getElementById('q').value === 'タカハシ ヨウコ' && document.querySelector('#search-results li[data-person=px6] button');",
    )
    .await?;
    b.tab_to("#search-results li[data-person=px6] button", false, 30)
        .await?;
    b.keys(&[key(Key::Enter)]).await?;
    b.wait_js(
        "高橋 陽子 opened",
        "const c = document.querySelector('#members input[data-person=px6]'); return c && c.checked && document.activeElement === c;",
    )
    .await?;
    let f = b.focused("#members input[data-person=px6]").await?;
    anyhow::ensure!(f["visible"] == json!(true), "focus not visible: {f}");
    b.keys(&[key(Key::Space)]).await?;
    b.wait_js(
        "unticked",
        "return !document.querySelector('#members input[data-person=px6]').checked;",
    )
    .await?;
    b.tab_to("#do-checkin", false, 5).await?;
    b.keys(&[key(Key::Enter)]).await?;
    b.wait_js(
        "nobody ticked",
        "return document.getElementById('intake-result').textContent.includes('1人以上選んでください');",
    )
    .await?;
    b.tab_to("#members input[data-person=px6]", true, 5).await?;
    b.keys(&[key(Key::Space)]).await?;
    b.tab_to("#do-checkin", false, 5).await?;
    b.keys(&[key(Key::Space)]).await?;
    b.wait_js(
        "checked in",
        "return document.getElementById('intake-result').textContent.includes('1 人をチェックインしました') \
           && (document.body.dataset.membersRefreshing || '0') === '0' \
           && document.querySelector('#members li[data-person=px6] .where').textContent.includes('この避難所');",
    )
    .await?;
    let (s, v) = s1.api("GET", "/api/v1/persons/px6", None)?;
    anyhow::ensure!(
        s == 200
            && v["location"]["shelter_id"] == json!("shelter-01")
            && v["location"]["status"] == json!("in"),
        "px6 after the keyboard check-in: {s} {v}"
    );
    // The focus stayed on the button (not thrown back to the page top).
    let f = b.focused("#do-checkin").await?;
    anyhow::ensure!(
        f["matches"] == json!(true) && f["visible"] == json!(true),
        "focus after the check-in: {f}"
    );
    b.screenshot_at("shelter-keyboard", "#intake").await?;
    Ok(())
}

/// RFC 4648 base32 (no padding), as in an otpauth:// URI.
fn base32_decode(s: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => bail!("not base32: {s}"),
        };
        acc = (acc << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// A password sign-in on a node that shows medical data needs the
/// operator's one-time code: a wrong code is refused with a sentence, the
/// right one signs in, sign-out ends the session, and the same code does
/// not sign in a second time.
async fn second_factor_and_logout(b: &Browser, mesh: &mut Mesh) -> Result<()> {
    let cl = mesh.node("clinic-1");
    const PW: &str = "clinic nurse password 3";
    cl.add_operator("nurse-3", Some(PW))?;
    let d = cl.data();
    let uri = kizuna(
        &[
            "operator",
            "totp",
            "--data-dir",
            d.to_str().unwrap(),
            "--name",
            "nurse-3",
        ],
        "",
    )?;
    let secret = uri
        .split("secret=")
        .nth(1)
        .and_then(|r| r.split('&').next())
        .context("otpauth URI without a secret")?;
    let secret = base32_decode(secret)?;
    let back = b.c.window().await?;
    let w = b.c.new_window(true).await?.handle;
    b.c.switch_to_window(w.clone()).await?;
    let login = format!("{}/ui/login", cl.base());
    let code_now = || {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        node::auth::totp(&secret, t)
    };
    // The clinic tab of step 7 left a session in this browser: sign out.
    b.c.goto(&login).await?;
    let page = b
        .wait_js(
            "a page",
            "return document.getElementById('name') ? 'login' : (document.body.dataset.screen ? 'in' : null);",
        )
        .await?;
    if page == json!("in") {
        b.submit(
            "form.logout button[type=submit]",
            "the login page",
            "return location.pathname === '/ui/login' && document.getElementById('name');",
        )
        .await?;
    }
    // A wrong code.
    b.fill("#name", "nurse-3").await?;
    b.fill("#password", PW).await?;
    b.fill(
        "#totp",
        &format!("{:06}", (code_now() + 500_000) % 1_000_000),
    )
    .await?;
    let err = b
        .submit(
            ".password-login button[type=submit]",
            "the refusal",
            "const e = document.getElementById('login-error'); return e && e.textContent;",
        )
        .await?;
    anyhow::ensure!(
        err.as_str()
            .unwrap_or("")
            .contains("ワンタイムコードが違います"),
        "{err}"
    );
    // The right code.
    let code = format!("{:06}", code_now());
    b.fill("#name", "nurse-3").await?;
    b.fill("#password", PW).await?;
    b.fill("#totp", &code).await?;
    let who = b
        .submit(
            ".password-login button[type=submit]",
            "the clinic screen",
            "return document.body.dataset.screen === 'clinic' && document.getElementById('operator').textContent;",
        )
        .await?;
    anyhow::ensure!(who == json!("nurse-3"), "{who}");
    // Sign out: back at the login page, and the screen asks again.
    b.submit(
        "form.logout button[type=submit]",
        "the login page",
        "return location.pathname === '/ui/login';",
    )
    .await?;
    b.c.goto(&format!("{}/ui/", cl.base())).await?;
    b.wait_js(
        "the login page again",
        "return location.pathname === '/ui/login';",
    )
    .await?;
    // The code seen once does not sign in again.
    b.fill("#name", "nurse-3").await?;
    b.fill("#password", PW).await?;
    b.fill("#totp", &code).await?;
    let err = b
        .submit(
            ".password-login button[type=submit]",
            "the refusal of a used code",
            "const e = document.getElementById('login-error'); return e && e.textContent;",
        )
        .await?;
    anyhow::ensure!(
        err.as_str()
            .unwrap_or("")
            .contains("ワンタイムコードが違います"),
        "{err}"
    );
    b.c.close_window().await?;
    b.c.switch_to_window(back).await?;
    Ok(())
}

/// Another shelter's desk transfers a person checked in at shelter-01, then
/// checks them out; shelter-01's roster loses them.
async fn transfer_and_checkout(b: &Browser, mesh: &mut Mesh) -> Result<()> {
    let back = b.c.window().await?;
    let w = b.c.new_window(true).await?.handle;
    b.c.switch_to_window(w.clone()).await?;
    sign_in_link(b, mesh.node("shelter-02"), "desk").await?;
    b.fill("#q", "スズキ").await?;
    b.fill("#birth", "1990-02-03").await?;
    b.click("#search-form button[type=submit]").await?;
    open_found(b, "px5").await?;
    b.wait_js(
        "in at the other shelter",
        "const w = document.querySelector('#members li[data-person=px5] .where'); \
         return w && w.textContent.includes('shelter-01') && document.getElementById('do-transfer');",
    )
    .await?;
    b.click("#do-transfer").await?;
    b.wait_js(
        "transferred",
        "return document.getElementById('intake-result').textContent.includes('1 人を転入しました');",
    )
    .await?;
    b.wait_js(
        "here now",
        "const w = document.querySelector('#members li[data-person=px5] .where'); return w && w.textContent.includes('この避難所');",
    )
    .await?;
    b.wait_js(
        "on this roster",
        "return document.querySelector('#roster tbody tr[data-person=px5]');",
    )
    .await?;
    // Check out (a person already here comes unticked).
    b.js("document.querySelectorAll('#members input').forEach(c => { c.checked = true; });")
        .await?;
    b.click("#do-checkout").await?;
    b.wait_js(
        "checked out",
        "return document.getElementById('intake-result').textContent.includes('1 人をチェックアウトしました');",
    )
    .await?;
    b.wait_js(
        "shown as out",
        "const w = document.querySelector('#members li[data-person=px5] .where'); return w && w.textContent.includes('退所');",
    )
    .await?;
    b.wait_js(
        "off this roster",
        "return !document.querySelector('#roster tbody tr[data-person=px5]');",
    )
    .await?;
    // shelter-01's desk (its replica, over the mesh) no longer lists them.
    let s1 = mesh.node("shelter-01");
    let start = std::time::Instant::now();
    loop {
        let (s, v) = s1.api("GET", "/api/v1/persons/px5", None)?;
        anyhow::ensure!(s == 200, "{s} {v}");
        if v["location"]["shelter_id"] == json!("shelter-02")
            && v["location"]["status"] == json!("out")
        {
            anyhow::ensure!(
                v["location"]["conflict"] == json!(false),
                "a transfer became a conflict: {v}"
            );
            break;
        }
        if start.elapsed() > DEADLINE {
            bail!("shelter-01 never saw the transfer and check-out: {v}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    b.c.close_window().await?;
    b.c.switch_to_window(back).await?;
    Ok(())
}

async fn sign_in(b: &Browser, mesh: &mut Mesh) -> Result<()> {
    let s1 = mesh.node("shelter-01");
    b.c.goto(&format!("{}/ui/", s1.base())).await?;
    b.wait_js(
        "the login page",
        "return location.pathname === '/ui/login';",
    )
    .await?;
    b.screenshot("login").await?;
    // A wrong password: a sentence, not JSON.
    b.fill("#name", "desk").await?;
    b.fill("#password", "not the password").await?;
    let err = b
        .submit(
            ".password-login button[type=submit]",
            "the error",
            "const e = document.getElementById('login-error'); return e && e.textContent;",
        )
        .await?;
    anyhow::ensure!(
        err.as_str().unwrap().contains("パスワードが違います"),
        "{err}"
    );
    // A PIN without a staff tap: refused with a sentence.
    b.fill("#pin", PIN).await?;
    let err = b
        .submit(
            ".card-login button[type=submit]",
            "the card error",
            "const e = document.getElementById('login-error'); return e && e.textContent;",
        )
        .await?;
    anyhow::ensure!(err.as_str().unwrap().contains("職員カード"), "{err}");
    // Staff card tap, then the PIN.
    let card = Card::tap(0, STAFF)?;
    let start = std::time::Instant::now();
    loop {
        b.fill("#pin", PIN).await?;
        let v = b
            .submit(".card-login button[type=submit]", "the result", "return document.body.dataset.screen === 'shelter' ? 'in' : (document.getElementById('login-error') || {}).textContent;")
            .await?;
        if v == json!("in") {
            break;
        }
        if start.elapsed() > DEADLINE {
            bail!("staff card sign-in never succeeded: {v}");
        }
    }
    drop(card);
    let who = b.text("#operator").await?;
    anyhow::ensure!(who == "staff-1", "{who}");
    Ok(())
}

async fn tap_and_check_in(b: &Browser, mesh: &mut Mesh) -> Result<fantoccini::wd::WindowHandle> {
    let shelter_window = b.c.window().await?;
    // The hq dashboard in a second tab, before anything is checked in.
    let hq_window = b.c.new_window(true).await?.handle;
    b.c.switch_to_window(hq_window.clone()).await?;
    sign_in_link(b, mesh.node("hq-1"), "desk").await?;
    b.wait_js(
        "the dashboard",
        "return document.body.dataset.ready === '1';",
    )
    .await?;
    b.js("window.__notReloaded = true;").await?;
    let before = b
        .js("return Number(document.body.dataset.occupancy);")
        .await?;
    anyhow::ensure!(before == json!(0), "occupancy before: {before}");
    // The panels before anyone arrived: both shelters empty and never
    // synced (flagged), no arrivals, 旭町's residents all unaccounted
    // (山田 太郎 among them), no mail, every node connected.
    b.wait_js(
        "the empty shelters",
        "const r = (id) => document.querySelector('#shelters tbody tr[data-shelter=' + id + ']'); \
         return ['shelter-01', 'shelter-02'].every((id) => r(id) && r(id).querySelector('.occ').textContent === '0' \
         && r(id).textContent.includes('0 / 300') && r(id).classList.contains('stale') && r(id).textContent.includes('未同期'));",
    )
    .await?;
    b.wait_js(
        "the arrivals chart",
        "return document.querySelector('#arrivals-chart svg');",
    )
    .await?;
    let arrivals = b.js(ARRIVALS_JS).await?;
    anyhow::ensure!(
        arrivals == json!(0),
        "arrivals before any check-in: {arrivals}"
    );
    let asahi = b.wait_js("旭町's row", DISTRICT_JS).await?;
    let (residents, accounted) = (
        asahi["residents"].as_i64().unwrap_or(-1),
        asahi["accounted"].as_i64().unwrap_or(-1),
    );
    anyhow::ensure!(
        residents >= 3 && asahi["unaccounted"].as_i64() == Some(residents - accounted),
        "旭町 before: {asahi}"
    );
    b.click("#districts tbody tr[data-district=旭町] button")
        .await?;
    b.wait_js(
        "旭町's unaccounted",
        "return ['px1', 'px2', 'px3'].every((p) => document.querySelector('#unaccounted-list li[data-person=' + p + ']'));",
    )
    .await?;
    b.wait_js(
        "every node connected",
        "return ['shelter-01', 'shelter-02', 'ambulance-1', 'clinic-1'].every((n) => { \
         const li = document.querySelector('#peers li[data-node=' + n + ']'); return li && li.textContent.includes('● 接続中'); }) \
         && document.getElementById('mesh-violations').textContent === '0' \
         && document.getElementById('mesh-quarantined').textContent === '0';",
    )
    .await?;

    b.c.switch_to_window(shelter_window.clone()).await?;
    b.wait_js(
        "the card reader ready",
        "return document.getElementById('card-status').dataset.status === 'ready';",
    )
    .await?;
    {
        let _card = Card::tap(0, CARD_A)?;
        b.wait_js(
            "the household",
            "return document.querySelectorAll('#members li').length === 3;",
        )
        .await?;
    }
    let names = b.js("return Array.from(document.querySelectorAll('#members .name')).map(n => n.textContent);").await?;
    anyhow::ensure!(
        names == json!(["山田 太郎", "山田 花子", "山田 一郎"]),
        "{names}"
    );
    b.screenshot("shelter-household").await?;
    b.click("#do-checkin").await?;
    let msg = b.wait_js("the check-in", "const r = document.getElementById('intake-result'); return r.textContent.includes('3 人をチェックイン') && r.textContent;").await?;
    b.wait_js(
        "the roster",
        "return document.querySelectorAll('#roster tbody tr').length === 3;",
    )
    .await?;
    b.screenshot("shelter-checked-in").await?;
    let _ = msg;

    // The dashboard saw it without a reload.
    b.c.switch_to_window(hq_window.clone()).await?;
    b.wait_js(
        "the dashboard update",
        "return Number(document.body.dataset.occupancy) === 3 && window.__notReloaded === true;",
    )
    .await?;
    // Every panel shows what the desk just did.
    b.wait_js(
        "shelter-01 at 3 of 300, synced just now",
        "const r = (id) => document.querySelector('#shelters tbody tr[data-shelter=' + id + ']'); const a = r('shelter-01'), b = r('shelter-02'); \
         return a.querySelector('.occ').textContent === '3' && a.textContent.includes('3 / 300') && a.querySelector('meter').value === 3 \
         && !a.classList.contains('stale') && /[0-9]+ 分前/.test(a.textContent) \
         && b.querySelector('.occ').textContent === '0' && b.classList.contains('stale');",
    )
    .await?;
    b.wait_js(
        "3 arrivals on the chart",
        &format!("return (() => {{ {ARRIVALS_JS} }})() === 3;"),
    )
    .await?;
    b.c.execute(
        "window.__want = arguments[0];",
        vec![json!([residents, accounted + 3, residents - accounted - 3])],
    )
    .await?;
    b.wait_js(
            "旭町 with 3 more accounted for",
            &format!(
                "const d = (() => {{ {DISTRICT_JS} }})(); \
                 return d && d.residents === window.__want[0] && d.accounted === window.__want[1] && d.unaccounted === window.__want[2];"
        ),
    )
    .await?;
    b.click("#districts tbody tr[data-district=旭町] button")
        .await?;
    b.wait_js(
        "旭町's unaccounted without the 山田 household",
        "const l = document.getElementById('unaccounted-list'); \
         return l && l.querySelectorAll('li').length === window.__want[2] \
         && ['px1', 'px2', 'px3'].every((p) => !l.querySelector('li[data-person=' + p + ']'));",
    )
    .await?;
    // One arrival with four consented contacts: one mail each, ending as
    // the relay decided, with the refusals' reasons.
    b.wait_js(
        "the outbox",
        "const n = (s) => document.querySelector('#outbox-counts dd[data-status=' + s + ']').textContent; \
         const t = document.querySelector('#outbox-failures tbody').textContent; \
         return n('sent') === '1' && n('failed') === '1' && n('indeterminate') === '1' && n('pending') === '1' \
         && document.getElementById('kpi-mail').textContent === '1 / 4' \
         && t.includes('mailbox unavailable') && t.includes('try again later') && t.includes('不確定');",
    )
    .await?;
    // Find a person: 山田 太郎 by hiragana, in at shelter-01.
    b.fill("#q", "やまだ たろう").await?;
    b.click("#search-form button[type=submit]").await?;
    open_found(b, "px1").await?;
    b.wait_js(
        "山田 太郎 found in shelter-01",
        "const li = document.querySelector('#search-results li[data-person=px1]'); \
         return li && !li.querySelector('button') && li.textContent.includes('山田 太郎') && li.textContent.includes('在所 · shelter-01');",
    )
    .await?;
    // Mesh health: a lost tablet's certificate revoked, its list loaded
    // at headquarters.
    b.wait_js(
        "no node revoked",
        "return document.getElementById('mesh-revoked').textContent === '0';",
    )
    .await?;
    let ca = mesh.dir.path().join("ca");
    let lost = crdt::NodeId::new("ambulance-9").unwrap();
    certs::ca::issue_sealed_at(
        &ca,
        crdt::Role::Ambulance,
        &lost,
        &mesh.dir.path().join("ambulance-9"),
        30,
        time::OffsetDateTime::now_utc(),
        None,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    certs::ca::revoke(&ca, &lost).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hq = mesh.node("hq-1");
    let (s, r) = http_bytes(
        hq.http,
        "POST",
        "/api/v1/crl",
        &[
            ("Authorization", &format!("Bearer {}", hq.token)),
            ("Content-Type", "application/pkix-crl"),
        ],
        &std::fs::read(ca.join("crl.der"))?,
    )?;
    anyhow::ensure!(s == 200, "loading the revocation list: {s} {r}");
    b.wait_js(
        "one node revoked",
        "return document.getElementById('mesh-revoked').textContent === '1';",
    )
    .await?;
    b.screenshot("hq-dashboard").await?;

    // A second tap of the same card: everyone is already here.
    b.c.switch_to_window(shelter_window.clone()).await?;
    {
        let _card = Card::tap(0, CARD_A)?;
        b.wait_js("the household again", "return document.querySelectorAll('#members li').length === 3 && document.getElementById('intake-result').textContent === '';").await?;
    }
    b.wait_js("members shown as here", "return Array.from(document.querySelectorAll('#members .where')).every(w => w.textContent.includes('この避難所'));").await?;
    // Tick them by hand (they come unticked when already here) and check in.
    b.js("document.querySelectorAll('#members input').forEach(c => { c.checked = true; });")
        .await?;
    b.click("#do-checkin").await?;
    b.wait_js("nothing twice", "return document.getElementById('intake-result').textContent.includes('3 人はすでに処理済み');").await?;
    let rows = b
        .js("return document.querySelectorAll('#roster tbody tr').length;")
        .await?;
    anyhow::ensure!(rows == json!(3), "roster after a second tap: {rows}");
    Ok(hq_window)
}

/// The page as printed: whether print media is in force, the controls
/// and navigation still visible (there should be none), and whether an
/// `@page` rule for print asks for A4.
const PRINTED_JS: &str = "const vis = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden'; \
     const controls = Array.from(document.querySelectorAll('header, nav, button, a, input, select, textarea, form')) \
       .filter(vis).map((e) => e.outerHTML.slice(0, 80)); \
     let a4 = false; \
     for (const sh of document.styleSheets) for (const r of sh.cssRules) \
       if (r instanceof CSSMediaRule && r.media.mediaText.includes('print')) \
         for (const q of r.cssRules) if (q instanceof CSSPageRule && /^A4\\b/i.test(q.style.getPropertyValue('size'))) a4 = true; \
     return {print: matchMedia('print').matches, controls: controls, a4: a4};";

/// The total of the arrivals chart's bars (each bar's title ends in its
/// count), or null before it is drawn.
const ARRIVALS_JS: &str = "const bars = document.querySelectorAll('#arrivals-chart svg rect.bar'); \
     if (!document.querySelector('#arrivals-chart svg')) return null; \
     return Array.from(bars).reduce((a, r) => a + Number(r.querySelector('title').textContent.split(': ').pop()), 0);";

/// The 旭町 row of the districts table as numbers, or null.
const DISTRICT_JS: &str = "const r = document.querySelector('#districts tbody tr[data-district=旭町]'); \
     if (!r) return null; const c = r.querySelectorAll('td.num'); \
     return {residents: Number(c[0].textContent), accounted: Number(c[1].textContent), unaccounted: Number(c[2].textContent)};";

async fn cardless(b: &Browser, mesh: &mut Mesh) -> Result<()> {
    let _ = mesh;
    // The household from the card tap is still open. Its refresh after a
    // check-in is held on its way while staff open someone else; when it
    // arrives it must not put the old household back on screen.
    b.wait_js(
        "no refresh under way",
        "return (document.body.dataset.membersRefreshing || '0') === '0';",
    )
    .await?;
    let held = b
        .js("if (!window.__realFetch) { \
               window.__realFetch = window.fetch; window.__held = []; \
               window.fetch = function (path, opts) { \
                 const hold = (window.__holdIds || []).some((id) => String(path).endsWith('/api/v1/persons/' + encodeURIComponent(id))); \
                 if (!hold) return window.__realFetch(path, opts); \
                 return new Promise((res) => window.__held.push(() => res(window.__realFetch(path, opts)))); \
               }; \
             } \
             window.__holdIds = Array.from(document.querySelectorAll('#members li[data-person]')).map((li) => li.dataset.person); \
             return window.__holdIds.length;")
        .await?;
    anyhow::ensure!(held == json!(3), "the household of 3 is open: {held}");
    b.js("document.querySelectorAll('#members input').forEach(c => { c.checked = true; });")
        .await?;
    b.click("#do-checkin").await?;
    b.wait_js("the refresh held", "return window.__held.length === 1;")
        .await?;
    // Search by hiragana and birth date finds the katakana registry entry.
    b.fill("#q", "すずき").await?;
    b.fill("#birth", "1990-02-03").await?;
    b.click("#search-form button[type=submit]").await?;
    b.wait_js(
        "one result",
        "return document.querySelectorAll('#search-results li[data-person]').length === 1;",
    )
    .await?;
    b.click("#search-results li[data-person=px5] button")
        .await?;
    b.wait_js(
        "the person",
        "return document.querySelectorAll('#members li[data-person=px5]').length === 1;",
    )
    .await?;
    b.js("window.__holdIds = null; const h = window.__held; window.__held = []; h.forEach((f) => f());")
        .await?;
    b.wait_js(
        "the old refresh finished",
        "return document.body.dataset.membersRefreshing === '0';",
    )
    .await?;
    let on_screen = b
        .js("return Array.from(document.querySelectorAll('#members li[data-person]')).map((li) => li.dataset.person);")
        .await?;
    anyhow::ensure!(
        on_screen == json!(["px5"]),
        "a late refresh replaced the person opened after it: {on_screen}"
    );
    b.click("#do-checkin").await?;
    b.wait_js("checked in", "return document.getElementById('intake-result').textContent.includes('1 人をチェックイン');").await?;
    // Someone not in the registry.
    b.fill("#reg-name", "ジョン・スミス").await?;
    b.fill("#reg-kana", "ジョン スミス").await?;
    b.fill("#reg-birth", "1985-01-02").await?;
    b.fill("#reg-note", "カードなし・観光客").await?;
    b.click("#register-form button[type=submit]").await?;
    b.wait_js("the new person", "return Array.from(document.querySelectorAll('#members .name')).some(n => n.textContent === 'ジョン・スミス');").await?;
    b.click("#do-checkin").await?;
    b.wait_js("checked in", "return document.getElementById('intake-result').textContent.includes('1 人をチェックイン');").await?;
    b.wait_js("the roster of 5", "return document.querySelectorAll('#roster tbody tr').length === 5 && document.getElementById('roster-count').textContent.includes('5');").await?;
    b.screenshot_at("shelter-desk", "#roster-sec").await?;
    // Filter, then the print view.
    b.fill("#roster-filter", "山田").await?;
    b.wait_js(
        "filtered",
        "return document.querySelectorAll('#roster tbody tr').length === 3;",
    )
    .await?;
    b.fill("#roster-filter", "").await?;
    let base = b.c.current_url().await?;
    b.c.goto(base.join("/ui/roster/print")?.as_str()).await?;
    b.wait_js(
        "the print roster",
        "return document.querySelectorAll('table.print-roster tbody tr').length === 5;",
    )
    .await?;
    b.screenshot("roster-print").await?;
    // Printed: only the title, the count and the table, on A4.
    let printed = b.as_printed(PRINTED_JS).await?;
    anyhow::ensure!(
        printed["print"] == json!(true)
            && printed["controls"] == json!([])
            && printed["a4"] == json!(true),
        "the roster as printed: {printed}"
    );
    let rows = b.as_printed("return Array.from(document.querySelectorAll('table.print-roster tbody tr')).filter((r) => r.getClientRects().length).length;").await?;
    anyhow::ensure!(rows == json!(5), "printed rows: {rows}");
    let pdf = b.print_pdf("roster-print").await?;
    anyhow::ensure!(pdf_pages(&pdf) == 1, "roster pages: {}", pdf_pages(&pdf));
    b.c.goto(base.join("/ui/")?.as_str()).await?;
    b.wait_js("the desk", "return document.body.dataset.screen === 'shelter' && document.querySelectorAll('#roster tbody tr').length === 5;").await?;
    Ok(())
}

async fn payloads_shelter(b: &Browser, mesh: &mut Mesh) -> Result<()> {
    for (i, p) in PAYLOADS.iter().enumerate() {
        // Registration: name, kana and note.
        b.fill("#reg-name", p).await?;
        b.fill("#reg-kana", &format!("ペイロード {i}")).await?;
        b.fill("#reg-note", p).await?;
        b.js("const r = document.getElementById('register-result'); r.textContent = ''; r.className = 'result';").await?;
        b.click("#register-form button[type=submit]").await?;
        b.c.execute("window.__want = arguments[0];", vec![json!(p)])
            .await?;
        b.wait_js(
            "the registration",
            "const r = document.getElementById('register-result'); const n = document.querySelector('#members .name'); \
             return (r.classList.contains('error') && r.textContent) || (n && n.textContent === window.__want);",
        )
        .await?;
        let shown = b
            .js("const n = document.querySelector('#members .name'); const r = document.getElementById('register-result'); \
                 return {name: n ? n.textContent : null, error: r.classList.contains('error') ? r.textContent : null};")
            .await?;
        if shown["name"] != json!(p) {
            // A refusal must be a sentence (validation), never markup.
            let e = shown["error"].as_str().unwrap_or("");
            anyhow::ensure!(
                e.contains("入力内容を確認"),
                "payload {i} neither shown nor refused: {shown}"
            );
        }
        b.assert_no_injection(&format!("registration payload {i}"))
            .await?;
        // Search and roster filter.
        b.fill("#q", p).await?;
        b.fill("#birth", "").await?;
        b.click("#search-form button[type=submit]").await?;
        b.wait_js(
            "search answered",
            "return document.querySelectorAll('#search-results li').length > 0;",
        )
        .await?;
        b.fill("#roster-filter", p).await?;
        b.assert_no_injection(&format!("search/filter payload {i}"))
            .await?;
    }
    b.fill("#roster-filter", "").await?;
    // The roster and the print view show the payload names as text.
    b.wait_js(
        "payload rows",
        "return document.querySelectorAll('#roster tbody tr').length >= 5;",
    )
    .await?;
    let base = b.c.current_url().await?;
    b.c.goto(base.join("/ui/roster/print")?.as_str()).await?;
    b.wait_js(
        "the print roster",
        "return document.querySelectorAll('table.print-roster tbody tr').length >= 5;",
    )
    .await?;
    b.assert_no_injection("print view").await?;
    b.c.goto(base.join("/ui/")?.as_str()).await?;
    b.wait_js(
        "the desk",
        "return document.body.dataset.screen === 'shelter';",
    )
    .await?;
    // Registered payload persons are not checked in; check one in so the
    // roster carries markup-shaped names too.
    b.fill("#q", "ペイロード 0").await?;
    b.click("#search-form button[type=submit]").await?;
    b.wait_js(
        "found",
        "return document.querySelectorAll('#search-results li[data-person] button').length >= 1;",
    )
    .await?;
    b.click("#search-results li[data-person] button").await?;
    b.wait_js(
        "opened",
        "return document.querySelectorAll('#members li').length === 1;",
    )
    .await?;
    b.click("#do-checkin").await?;
    b.wait_js(
        "in",
        "return document.querySelectorAll('#roster tbody tr').length === 6;",
    )
    .await?;
    let cell = b
        .js("return document.querySelector('#roster tbody tr[data-person] td bdi') !== null;")
        .await?;
    anyhow::ensure!(cell == json!(true));
    b.assert_no_injection("roster").await?;
    // The login form of another node.
    let s2 = mesh.node("shelter-02").base();
    let desk = b.c.window().await?;
    let w = b.c.new_window(true).await?.handle;
    b.c.switch_to_window(w.clone()).await?;
    b.c.goto(&format!("{s2}/ui/login")).await?;
    for (i, p) in PAYLOADS.iter().enumerate() {
        b.fill("#name", p).await?;
        b.fill("#password", p).await?;
        b.submit(".password-login button[type=submit]", "refused", "const e = document.getElementById('login-error'); return e && e.textContent.includes('パスワードが違います');").await?;
        b.assert_no_injection(&format!("login payload {i}")).await?;
    }
    b.c.close_window().await?;
    b.c.switch_to_window(desk).await?;
    Ok(())
}

async fn shelter_no_medical(b: &Browser, mesh: &mut Mesh) -> Result<()> {
    let _ = mesh;
    let none = b.js("return document.getElementById('profile-sec') === null && document.getElementById('reason-form') === null;").await?;
    anyhow::ensure!(none == json!(true), "the shelter screen has a medical view");
    // Even asked directly with the session, the node refuses (and audits).
    let v = b
        .c
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch('/api/v1/persons/px4/medical?reason=emergency_transport', {credentials: 'same-origin'}) \
               .then(r => r.json().then(j => done({status: r.status, code: j.error && j.error.code})));",
            vec![],
        )
        .await?;
    anyhow::ensure!(v == json!({"status": 403, "code": "forbidden"}), "{v}");
    Ok(())
}

async fn ambulance(
    b: &Browser,
    mesh: &mut Mesh,
    hq_window: &fantoccini::wd::WindowHandle,
) -> Result<()> {
    let w = b.c.new_window(true).await?.handle;
    b.c.switch_to_window(w.clone()).await?;
    let amb = mesh.node("ambulance-1");
    sign_in_link(b, amb, "desk").await?;
    b.wait_js(
        "the reader",
        "return document.getElementById('card-status').dataset.status === 'ready';",
    )
    .await?;
    {
        let _card = Card::tap(1, CARD_B)?;
        b.wait_js("the patient", "const n = document.getElementById('person-name'); return n && n.textContent.includes('佐藤 健太');").await?;
    }
    b.screenshot("ambulance-tap").await?;
    b.click("#reason-form button[type=submit]").await?;
    b.wait_js("the profile", "const p = document.getElementById('profile'); return p && p.textContent.includes('ペニシリン') && p.textContent.includes('三条内科医院');").await?;
    let blood = b.text("#blood-type").await?;
    anyhow::ensure!(blood == "A+", "{blood}");
    b.screenshot_at("ambulance-profile", "#profile-sec").await?;
    // The handover for the hospital, as printed: the profile alone, no
    // navigation, buttons or forms, on one page.
    let printed = b.as_printed(PRINTED_JS).await?;
    anyhow::ensure!(
        printed["print"] == json!(true) && printed["controls"] == json!([]),
        "the handover as printed: {printed}"
    );
    let shown = b
        .as_printed(
            "return Array.from(document.querySelectorAll('main .panel')).filter((p) => p.getClientRects().length).map((p) => p.id + ': ' + p.innerText);",
        )
        .await?;
    let shown = shown.as_array().cloned().unwrap_or_default();
    anyhow::ensure!(
        shown.len() == 1 && {
            let t = shown[0].as_str().unwrap_or("");
            t.starts_with("profile-sec: ")
                && [
                    "佐藤 健太",
                    "A+",
                    "ペニシリン",
                    "高血圧",
                    "アムロジピン",
                    "三条内科医院",
                    "佐藤 花子",
                ]
                .iter()
                .all(|w| t.contains(w))
        },
        "the handover as printed shows: {shown:?}"
    );
    let pdf = b.print_pdf("ambulance-handover").await?;
    anyhow::ensure!(pdf_pages(&pdf) == 1, "handover pages: {}", pdf_pages(&pdf));
    // No consent recorded: refused, then break-glass.
    {
        let _card = Card::tap(1, CARD_C)?;
        b.wait_js("the second patient", "const n = document.getElementById('person-name'); return n && n.textContent.includes('鈴木 三郎');").await?;
    }
    b.click("#reason-form button[type=submit]").await?;
    b.wait_js("the refusal", "return !document.getElementById('bg-sec').hidden && document.getElementById('medical-result').textContent.includes('同意が記録されていません');").await?;
    b.fill("#bg-just", "意識なし・本人確認不能").await?;
    b.click("#bg-form button[type=submit]").await?;
    b.wait_js("the flagged profile", "const a = document.getElementById('bg-active'); return a && a.textContent.includes('ブレークグラス') && document.getElementById('profile').textContent.includes('造影剤');").await?;
    b.screenshot_at("ambulance-break-glass", "#profile-sec")
        .await?;
    // Justification payloads, as another crew member (each grant reads once).
    b.c.goto(&format!("{}/ui/login", amb.base())).await?;
    sign_in_link(b, amb, "crew-2").await?;
    b.fill("#q", "スズキ").await?;
    b.click("#search-form button[type=submit]").await?;
    open_found(b, "px5").await?;
    for (i, p) in PAYLOADS.iter().enumerate() {
        b.js("document.getElementById('bg-sec').hidden = false; document.getElementById('bg-banner').textContent = ''; const r = document.getElementById('medical-result'); r.textContent = ''; r.className = 'result';")
            .await?;
        b.fill("#bg-just", p).await?;
        b.click("#bg-form button[type=submit]").await?;
        b.wait_js("the grant", "return document.getElementById('bg-active') || document.getElementById('medical-result').classList.contains('error');").await?;
        b.assert_no_injection(&format!("justification payload {i}"))
            .await?;
    }
    // Headquarters lists the break-glass use for review.
    b.c.switch_to_window(hq_window.clone()).await?;
    b.wait_js("the review list", "return Array.from(document.querySelectorAll('#bg-review tbody tr')).some(r => r.textContent.includes('break_glass_grant') && r.textContent.includes('意識なし'));").await?;
    b.assert_no_injection("hq break-glass review").await?;
    b.c.switch_to_window(w).await?;
    b.c.close_window().await?;
    b.c.switch_to_window(hq_window.clone()).await?;
    Ok(())
}

async fn clinic(b: &Browser, mesh: &mut Mesh) -> Result<()> {
    let w = b.c.new_window(true).await?.handle;
    b.c.switch_to_window(w.clone()).await?;
    let cl = mesh.node("clinic-1");
    sign_in_link(b, cl, "desk").await?;
    b.fill("#q", "さとう").await?;
    b.click("#search-form button[type=submit]").await?;
    open_found(b, "px4").await?;
    b.js("document.getElementById('reason').value = 'clinic_care';")
        .await?;
    b.click("#reason-form button[type=submit]").await?;
    b.wait_js(
        "the profile",
        "return document.getElementById('profile').textContent.includes('アムロジピン');",
    )
    .await?;
    b.wait_js("the eligibility", "const e = document.getElementById('elig').textContent; return e.includes('三条市国民健康保険') && e.includes('1234567') && e.includes('2099-03-31') && e.includes('有効');").await?;
    b.fill("#entry-text", "ロキソプロフェン 60mg").await?;
    b.js("document.getElementById('entry-section').value = 'medication';")
        .await?;
    b.click("#add-entry-form button[type=submit]").await?;
    b.wait_js(
        "the new entry",
        "return document.getElementById('profile').textContent.includes('ロキソプロフェン');",
    )
    .await?;
    b.screenshot("clinic").await?;
    // Entry-text payloads, as another nurse (each save reads once).
    b.c.goto(&format!("{}/ui/login", cl.base())).await?;
    sign_in_link(b, cl, "nurse-2").await?;
    b.fill("#q", "さとう").await?;
    b.click("#search-form button[type=submit]").await?;
    open_found(b, "px4").await?;
    b.click("#reason-form button[type=submit]").await?;
    b.wait_js(
        "the profile",
        "return !document.getElementById('edit-sec').hidden;",
    )
    .await?;
    for (i, p) in PAYLOADS.iter().enumerate() {
        b.fill("#entry-text", p).await?;
        b.js("const r = document.getElementById('edit-result'); r.textContent = ''; r.className = 'result';").await?;
        b.js("document.getElementById('entry-section').value = 'condition';")
            .await?;
        b.click("#add-entry-form button[type=submit]").await?;
        let n = i + 2;
        b.c.execute("window.__want = arguments[0];", vec![json!(n)])
            .await?;
        b.wait_js("the entry", "return document.querySelectorAll('#profile ul[data-section=condition] li').length >= window.__want || document.getElementById('edit-result').classList.contains('error');").await?;
        b.assert_no_injection(&format!("entry payload {i}")).await?;
    }
    b.c.close_window().await?;
    Ok(())
}

async fn partition(
    b: &Browser,
    mesh: &mut Mesh,
    hq_window: &fantoccini::wd::WindowHandle,
) -> Result<()> {
    // Cut both shelters off from headquarters.
    mesh.node("hq-1").stop();
    let shelter_window =
        b.c.windows()
            .await?
            .into_iter()
            .find(|w| w != hq_window)
            .expect("shelter tab");
    b.c.switch_to_window(shelter_window.clone()).await?;
    b.js("location.reload();").await?;
    b.wait_js("the offline banner", "const e = document.getElementById('offline-banner'); return e && e.textContent.includes('本部と未接続');").await?;
    b.screenshot("shelter-offline").await?;
    // The same person checked in at both shelters while cut off.
    b.fill("#q", "イトウ マコト").await?;
    b.fill("#birth", "").await?;
    b.click("#search-form button[type=submit]").await?;
    open_found(b, "px7").await?;
    b.wait_js(
        "opened",
        "return document.querySelectorAll('#members li').length === 1;",
    )
    .await?;
    b.click("#do-checkin").await?;
    b.wait_js("in", "return document.getElementById('intake-result').textContent.includes('1 人をチェックイン');").await?;
    let (s, r) = mesh.node("shelter-02").api(
        "POST",
        "/api/v1/checkins",
        Some(json!({"person_ids": ["px7"], "op_id": "s2-px7"})),
    )?;
    anyhow::ensure!(s == 201, "{s} {r}");
    // Headquarters returns; the conflict is shown there and on the roster.
    mesh.node("hq-1").start()?;
    b.wait_js("the conflict on the roster", "const r = document.querySelector('#roster tbody tr[data-person=px7]'); return r && r.textContent.includes('競合');").await?;
    b.screenshot_at("shelter-conflict", "#roster-sec").await?;
    b.c.switch_to_window(hq_window.clone()).await?;
    sign_in_link(b, mesh.node("hq-1"), "desk").await?;
    b.wait_js("the conflicts queue", "return document.querySelector('#conflicts li[data-person=px7]') && document.getElementById('kpi-conflicts').textContent === '1';").await?;
    b.wait_js("names in the queue", "return document.querySelector('#conflicts li[data-person=px7]').textContent.includes('伊藤 誠');").await?;
    b.screenshot_at("hq-conflict", "#districts-sec").await?;
    // shelter-02's check-in while cut off reached the shelters table; then
    // shelter-02 is cut off itself, and headquarters shows it.
    b.wait_js(
        "shelter-02 with 1, synced",
        "const r = document.querySelector('#shelters tbody tr[data-shelter=shelter-02]'); \
         return r && r.querySelector('.occ').textContent === '1' && !r.classList.contains('stale');",
    )
    .await?;
    mesh.node("shelter-02").stop();
    b.wait_js(
        "shelter-02 cut off",
        "const li = document.querySelector('#peers li[data-node=shelter-02]'); \
         return li && li.textContent.includes('○ 切断') && !li.textContent.includes('接続中');",
    )
    .await?;
    mesh.node("shelter-02").start()?;
    b.wait_js(
        "shelter-02 back",
        "const li = document.querySelector('#peers li[data-node=shelter-02]'); return li && li.textContent.includes('● 接続中');",
    )
    .await?;
    Ok(())
}

async fn refusals(b: &Browser, mesh: &mut Mesh) -> Result<()> {
    let s1 = mesh.node("shelter-01");
    let port = s1.http;
    // The browser's session cookie and CSRF token for shelter-01.
    let shelter_window = b.c.windows().await?;
    let mut cookie = None;
    let mut csrf = None;
    for w in shelter_window {
        b.c.switch_to_window(w).await?;
        let url = b.c.current_url().await?;
        if url.port() == Some(port) && url.path() == "/ui/" {
            csrf = b
                .js("return document.body.dataset.csrf;")
                .await?
                .as_str()
                .map(str::to_string);
            for c in b.c.get_all_cookies().await? {
                if c.name() == "kz_session_shelter-01" {
                    cookie = Some(format!("{}={}", c.name(), c.value()));
                }
            }
        }
    }
    let (cookie, csrf) = (cookie.context("session cookie")?, csrf.context("csrf")?);
    let origin = format!("http://127.0.0.1:{port}");
    let body = r#"{"person_ids":["px1"]}"#;
    let post = |h: &[(&str, &str)]| http_raw(port, "POST", "/api/v1/checkins", h, body);
    let ct = ("Content-Type", "application/json");
    let ck = ("Cookie", cookie.as_str());
    let code = |r: (u16, String, String)| {
        let v: serde_json::Value = serde_json::from_str(&r.2).unwrap_or_default();
        (r.0, v["error"]["code"].as_str().unwrap_or("").to_string())
    };
    anyhow::ensure!(code(post(&[ct, ck, ("Origin", &origin)])?) == (403, "csrf".into()));
    anyhow::ensure!(
        code(post(&[
            ct,
            ck,
            ("Origin", &origin),
            ("X-CSRF-Token", "wrong")
        ])?) == (403, "csrf".into())
    );
    anyhow::ensure!(
        code(post(&[
            ct,
            ck,
            ("Origin", "http://evil.example"),
            ("X-CSRF-Token", &csrf)
        ])?) == (403, "bad_origin".into())
    );
    anyhow::ensure!(code(post(&[ct, ck, ("X-CSRF-Token", &csrf)])?) == (403, "bad_origin".into()));
    anyhow::ensure!(
        code(post(&[
            ct,
            ck,
            ("Host", "evil.example"),
            ("Origin", "http://evil.example"),
            ("X-CSRF-Token", &csrf)
        ])?) == (403, "bad_host".into())
    );
    let ok = post(&[ct, ck, ("Origin", &origin), ("X-CSRF-Token", &csrf)])?;
    anyhow::ensure!(ok.0 == 201, "the same request done right: {ok:?}");
    // A sign-in form posted without the page's token, or from elsewhere.
    let form = format!("csrf=x&name=desk&password={PASSWORD}");
    let fct = ("Content-Type", "application/x-www-form-urlencoded");
    let r = http_raw(
        port,
        "POST",
        "/ui/login",
        &[fct, ("Origin", &origin)],
        &form,
    )?;
    anyhow::ensure!(r.0 == 403, "login without the pre-session token: {}", r.0);
    let r = http_raw(
        port,
        "POST",
        "/ui/login",
        &[
            fct,
            ("Origin", "http://evil.example"),
            ("Cookie", "kz_pre_shelter-01=x"),
        ],
        &form,
    )?;
    anyhow::ensure!(r.0 == 403, "login from another origin: {}", r.0);
    // Sessions end when the operator is removed or their token rotated.
    for (name, how) in [("temp-1", "remove"), ("temp-2", "token")] {
        s1.add_operator(name, None)?;
        let link = s1.link(name)?;
        let path = &link[link.find("/ui/link/").unwrap()..];
        let (st, head, _) = http_raw(port, "GET", path, &[], "")?;
        anyhow::ensure!(st == 303, "link: {st}");
        let set = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("set-cookie: ")
                    .or_else(|| l.strip_prefix("Set-Cookie: "))
                    .filter(|c| c.starts_with("kz_session_"))
            })
            .context("session cookie")?;
        let c = set.split(';').next().unwrap().to_string();
        let get =
            || http_raw(port, "GET", "/api/v1/status", &[("Cookie", c.as_str())], "").map(|r| r.0);
        anyhow::ensure!(get()? == 200);
        // A one-time link works once.
        anyhow::ensure!(http_raw(port, "GET", path, &[], "")?.0 == 401);
        let d = s1.data();
        kizuna(
            &[
                "operator",
                how,
                "--data-dir",
                d.to_str().unwrap(),
                "--name",
                name,
            ],
            "",
        )?;
        anyhow::ensure!(get()? == 401, "session of {name} after `operator {how}`");
    }
    // Plain HTTP off loopback is refused unless allowed.
    let cfg =
        std::fs::read_to_string(&s1.config)?.replace("bind = \"127.0.0.1:", "bind = \"0.0.0.0:");
    let bad = s1.dir.join("open.toml");
    std::fs::write(&bad, cfg)?;
    let out = std::process::Command::new(kizuna_bin())
        .args(["run", "--config"])
        .arg(&bad)
        .output()?;
    anyhow::ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("allow_plain_http")
    );
    Ok(())
}

async fn sizes_and_language(
    b: &Browser,
    mesh: &mut Mesh,
    hq_window: &fantoccini::wd::WindowHandle,
) -> Result<()> {
    let _ = mesh;
    b.c.switch_to_window(hq_window.clone()).await?;
    b.c.set_window_size(1600, 1000).await?;
    b.wait_js(
        "the dashboard",
        "return document.body.dataset.ready === '1';",
    )
    .await?;
    b.screenshot("hq-desktop").await?;
    b.click("a.lang").await?;
    b.wait_js(
        "English",
        "return document.documentElement.lang === 'en' && document.body.dataset.ready === '1';",
    )
    .await?;
    let h = b.text("#shelters-h").await?;
    anyhow::ensure!(h == "Shelters", "{h}");
    b.screenshot("hq-english").await?;
    b.click("a.lang").await?;
    b.wait_js("Japanese", "return document.documentElement.lang === 'ja';")
        .await?;
    let shelter =
        b.c.windows()
            .await?
            .into_iter()
            .find(|w| w != hq_window)
            .expect("shelter tab");
    b.c.switch_to_window(shelter).await?;
    b.c.set_window_size(390, 844).await?;
    b.js("window.scrollTo(0, 0);").await?;
    b.screenshot("shelter-phone").await?;
    b.c.set_window_size(1280, 860).await?;
    // Keyboard only: every button and input has an accessible name.
    let unnamed = b
        .js("return Array.from(document.querySelectorAll('button, input:not([type=hidden]), select, a')).filter(e => { \
               const l = e.labels && e.labels.length ? e.labels[0].textContent : ''; \
               return !(e.getAttribute('aria-label') || l.trim() || e.textContent.trim() || e.title); }).map(e => e.outerHTML.slice(0, 80));")
        .await?;
    anyhow::ensure!(unnamed == json!([]), "controls without a name: {unnamed}");
    Ok(())
}
