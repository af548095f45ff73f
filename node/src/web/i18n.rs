//! The screens' words, Japanese first with English beside: one table,
//! used by the server-rendered pages ([`t`]) and handed to the page's
//! script as JSON ([`dictionary`], in a `data-` attribute, so no inline
//! script is needed).
//!
//! Error sentences are keyed by the API's error `code` (`err.CODE`), so
//! every refusal the API can give reads as a sentence, never as JSON.

use serde_json::{Map, Value};

/// The screen language, chosen with the switch in the header (a cookie).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Ja,
    En,
}

impl Lang {
    pub fn code(self) -> &'static str {
        match self {
            Lang::Ja => "ja",
            Lang::En => "en",
        }
    }
    pub fn other(self) -> Lang {
        match self {
            Lang::Ja => Lang::En,
            Lang::En => Lang::Ja,
        }
    }
    pub fn parse(s: &str) -> Lang {
        if s == "en" {
            Lang::En
        } else {
            Lang::Ja
        }
    }
}

/// (key, Japanese, English).
const STRINGS: &[(&str, &str, &str)] = &[
    ("app", "Kizuna", "Kizuna"),
    ("lang.switch", "English", "日本語"),
    ("role.shelter", "避難所受付", "Shelter desk"),
    ("role.facility", "施設受付", "Facility desk"),
    ("role.ambulance", "救急隊", "Ambulance"),
    ("role.clinic", "診療所", "Clinic"),
    ("role.hq", "災害対策本部", "Headquarters"),
    ("signed_in_as", "担当", "Signed in"),
    ("logout", "ログアウト", "Sign out"),
    ("login.title", "ログイン", "Sign in"),
    ("login.name", "担当者名", "Operator name"),
    ("login.password", "パスワード", "Password"),
    ("login.totp", "ワンタイムコード（6桁）", "One-time code (6 digits)"),
    ("login.totp_hint", "このノードは医療情報を扱うため、認証アプリのコードが必要です", "This node handles medical data: enter the code from your authenticator app"),
    ("login.submit", "ログイン", "Sign in"),
    ("login.card", "職員カードでログイン", "Sign in with a staff card"),
    ("login.card_hint", "職員カードをリーダーにタッチしてから、60秒以内にPINを入力してください", "Tap your staff card on the reader, then enter your PIN within 60 seconds"),
    ("login.pin", "PIN（4〜8桁）", "PIN (4 to 8 digits)"),
    ("login.card_submit", "カードとPINでログイン", "Sign in with card and PIN"),
    ("login.bad", "担当者名またはパスワードが違います", "Wrong operator name or password"),
    ("login.need_2fa", "ワンタイムコードを入力してください", "Enter the one-time code"),
    ("login.bad_2fa", "ワンタイムコードが違います", "Wrong one-time code"),
    ("login.expired_link", "このログインリンクは使用済みか期限切れです", "This sign-in link was already used or has expired"),
    ("login.refused", "この画面からのログインは受け付けられません（もう一度開き直してください）", "Sign-in refused from this page (reload it and try again)"),
    ("err.no_staff_tap", "60秒以内に職員カードがタッチされていません", "No staff card was tapped in the last 60 seconds"),
    ("err.not_staff", "最後にタッチされたカードは職員カードではありません", "The last card tapped is not a staff card"),
    ("err.no_pin", "この職員カードにはPINが設定されていません", "No PIN is set for this staff card"),
    ("err.bad_pin", "PINが違います", "Wrong PIN"),
    ("err.forbidden", "この端末の役割ではこの操作はできません", "This node's role may not do this"),
    ("err.not_found", "見つかりません", "Not found"),
    ("err.invalid_input", "入力内容を確認してください", "Please check the input"),
    ("err.invalid_json", "入力内容を確認してください", "Please check the input"),
    ("err.invalid_query", "検索条件を確認してください", "Please check the search"),
    ("err.rejected", "この操作は受け付けられませんでした", "The operation was refused"),
    ("err.unauthorized", "ログインが必要です", "Please sign in"),
    ("err.session_expired", "ログインの有効期限が切れました。もう一度ログインしてください", "Your session ended: please sign in again"),
    ("err.token_expired", "トークンの有効期限が切れています", "The token has expired"),
    ("err.csrf", "画面が古くなっています。再読み込みしてください", "This page is out of date: reload it"),
    ("err.bad_origin", "他のサイトからの操作は受け付けません", "Requests from other sites are refused"),
    ("err.bad_host", "このアドレスからの接続は受け付けません", "This address is not accepted"),
    ("err.storage_full", "記憶領域がいっぱいで保存できませんでした", "Storage is full: nothing was saved"),
    ("err.storage_error", "保存に失敗しました。もう一度お試しください", "Saving failed: please try again"),
    ("err.unavailable", "一時的に利用できません。もう一度お試しください", "Temporarily unavailable: please try again"),
    ("err.network", "ノードに接続できません", "Cannot reach the node"),
    ("err.unknown_reason", "閲覧理由を一覧から選んでください", "Choose a reason from the list"),
    ("err.rate_limited", "短時間に閲覧が多すぎます。しばらく待ってください", "Too many reads in a short time: please wait"),
    ("err.no_consent", "本人の同意が記録されていません。緊急時はブレークグラスで閲覧できます", "No recorded consent: in an emergency use break-glass access"),
    ("err.no_break_glass_grant", "ブレークグラスの許可がありません", "No break-glass grant"),
    ("banner.offline", "本部と未接続・最終同期 {n} 分前", "Not connected to headquarters · last sync {n} min ago"),
    ("banner.offline_never", "本部と未接続・まだ同期していません", "Not connected to headquarters · never synced"),
    ("banner.online", "本部と接続中", "Connected to headquarters"),
    ("banner.clock", "時刻が信頼できません", "Clock not trusted"),
    ("card.ready", "カードをタッチしてください", "Tap a card"),
    ("card.none", "カードリーダーなし（カードなしで受付できます）", "No card reader (register without a card)"),
    ("card.tap_error", "カードを読めませんでした。もう一度タッチしてください", "The card could not be read: tap again"),
    ("intake.title", "受付", "Check-in"),
    ("household.title", "世帯", "Household"),
    ("household.hint", "いる人にチェックを入れて、ボタンを押してください", "Tick who is present, then press a button"),
    ("household.none", "カードをタッチするか、名前で検索してください", "Tap a card or search by name"),
    ("where.nowhere", "未受付", "Not checked in"),
    ("where.in", "在所", "In"),
    ("where.out", "退所", "Out"),
    ("where.pending", "確認中", "Pending"),
    ("where.here", "この避難所", "this shelter"),
    ("conflict", "競合：複数の避難所で受付されています", "Conflict: checked in at more than one shelter"),
    ("conflict.short", "競合", "Conflict"),
    ("checkin", "チェックイン", "Check in"),
    ("checkout", "チェックアウト", "Check out"),
    ("transfer", "他の避難所から転入", "Transfer in from another shelter"),
    ("done.checkin", "{n} 人をチェックインしました", "Checked in {n}"),
    ("done.checkout", "{n} 人をチェックアウトしました", "Checked out {n}"),
    ("done.transfer", "{n} 人を転入しました", "Transferred in {n}"),
    ("done.already", "{n} 人はすでに処理済みです", "{n} already done"),
    ("select_someone", "1人以上選んでください", "Select at least one person"),
    ("search.title", "名前で検索（カードなし）", "Search by name (no card)"),
    ("search.q", "カナ・氏名", "Kana or name"),
    ("search.birth", "生年月日", "Birth date"),
    ("search.submit", "検索", "Search"),
    ("search.none", "該当者なし", "No match"),
    ("search.select", "選択", "Select"),
    ("register.title", "カードなしで新規登録", "Register without a card"),
    ("register.name", "氏名", "Name"),
    ("register.kana", "カナ", "Kana"),
    ("register.note", "メモ", "Note"),
    ("register.submit", "登録", "Register"),
    ("register.done", "登録しました", "Registered"),
    ("roster.title", "名簿", "Roster"),
    ("roster.filter", "名簿を絞り込み", "Filter the roster"),
    ("roster.count", "在所 {n} 人 / 定員 {cap} 人", "{n} in / capacity {cap}"),
    ("roster.print", "名簿を印刷（A4）", "Print roster (A4)"),
    ("roster.since", "受付時刻", "Since"),
    ("roster.status", "状態", "Status"),
    ("roster.printed", "印刷日時", "Printed"),
    ("roster.do_print", "印刷", "Print"),
    ("col.name", "氏名", "Name"),
    ("col.kana", "カナ", "Kana"),
    ("col.birth", "生年月日", "Birth date"),
    ("col.where", "現在地", "Where now"),
    ("col.shelter", "避難所", "Shelter"),
    ("person.title", "対象者", "Person"),
    ("medical.title", "医療情報", "Medical profile"),
    ("medical.reason", "閲覧理由", "Reason for access"),
    ("medical.read", "医療情報を表示", "Show medical profile"),
    ("medical.blood", "血液型", "Blood type"),
    ("medical.allergy", "アレルギー", "Allergies"),
    ("medical.condition", "既往歴・疾患", "Conditions"),
    ("medical.medication", "服薬", "Medications"),
    ("medical.family_doctor", "かかりつけ医", "Family doctor"),
    ("medical.emergency_contact", "緊急連絡先", "Emergency contacts"),
    ("medical.consent", "同意", "Consent"),
    ("medical.consented", "本人同意あり", "Consented"),
    ("medical.life_saving", "生命保護のための例外", "Life-saving exception"),
    ("medical.no_consent", "同意の記録なし", "No consent recorded"),
    ("medical.none", "記録なし", "None recorded"),
    ("medical.conflict", "競合する値", "Conflicting value"),
    ("medical.audited", "この閲覧は記録されました（記録番号 {n}）", "This read was recorded (audit entry {n})"),
    ("medical.handover", "病院への引継ぎ用に印刷", "Print for hospital handover"),
    ("medical.no_profile", "医療情報は登録されていません", "No medical profile on record"),
    ("bg.title", "ブレークグラス（緊急アクセス）", "Break-glass (emergency access)"),
    ("bg.hint", "同意の記録がない人の情報を緊急に見る場合のみ使います。理由は記録され、本部で確認されます。氏名や病名は書かないでください。", "Only to read the profile of someone without recorded consent in an emergency. The reason is recorded and reviewed at headquarters. Do not write names or conditions."),
    ("bg.justification", "緊急の理由（例：意識なし・本人確認不能）", "Why now (e.g. unconscious, cannot ask)"),
    ("bg.submit", "緊急アクセスを記録して表示", "Record emergency access and show"),
    ("bg.active", "ブレークグラスによる閲覧（{t} まで有効・本部で確認されます）", "Break-glass access (valid until {t}; reviewed at headquarters)"),
    ("clinic.edit", "医療情報の編集", "Edit medical profile"),
    ("clinic.section", "項目", "Section"),
    ("clinic.text", "内容", "Text"),
    ("clinic.add", "追加", "Add"),
    ("clinic.remove", "削除", "Remove"),
    ("clinic.set_blood", "血液型を設定", "Set blood type"),
    ("clinic.set_consent", "同意を記録", "Record consent"),
    ("clinic.saved", "保存しました", "Saved"),
    ("elig.title", "保険資格（オフライン確認）", "Insurance eligibility (offline check)"),
    ("elig.insurer", "保険者", "Insurer"),
    ("elig.number", "記号・番号・枝番", "Symbol, number, branch"),
    ("elig.valid", "有効期間", "Valid"),
    ("elig.copay", "窓口負担", "Co-payment"),
    ("elig.as_of", "情報の時点", "Record as of"),
    ("elig.eligible", "資格", "Eligibility"),
    ("elig.s_valid", "有効", "valid"),
    ("elig.s_expired", "期限切れ", "expired"),
    ("elig.s_unknown", "不明", "unknown"),
    ("elig.none", "資格情報はありません", "No eligibility on record"),
    ("elig.note", "保険者番号・記号・番号はこの診療所の画面だけに表示され、他の端末では伏せられます。確認は記録されます", "Insurance numbers are shown only on clinic screens and masked elsewhere; every check is recorded"),
    ("hq.evacuees", "避難者数", "Evacuees"),
    ("hq.shelters", "避難所", "Shelters"),
    ("hq.occupancy", "在所 / 定員", "In / capacity"),
    ("hq.last_sync", "最終同期", "Last sync"),
    ("hq.stale", "未接続の可能性", "possibly cut off"),
    ("hq.never", "未同期", "never"),
    ("hq.min_ago", "{n} 分前", "{n} min ago"),
    ("hq.arrivals", "到着の推移（現在在所中の人の受付時刻・1時間ごと）", "Arrivals (check-in time of those in now, per hour)"),
    ("hq.districts", "地区別の安否未確認者", "Residents not yet accounted for, by district"),
    ("hq.district", "地区", "District"),
    ("hq.residents", "住民", "Residents"),
    ("hq.accounted", "確認済み", "Accounted"),
    ("hq.unaccounted", "未確認", "Not accounted"),
    ("hq.show", "一覧", "List"),
    ("hq.conflicts", "競合の確認待ち", "Conflicts to review"),
    ("hq.no_conflicts", "競合はありません", "No conflicts"),
    ("hq.outbox", "家族への安否メール", "Family safety mail"),
    ("hq.mail_reason", "理由", "Reason"),
    ("hq.mesh", "ネットワークの状態", "Mesh health"),
    ("hq.peers", "接続先", "Peers"),
    ("hq.connected", "接続中", "connected"),
    ("hq.disconnected", "切断", "disconnected"),
    ("hq.violations", "規則違反", "Violations"),
    ("hq.quarantined", "隔離された文書", "Quarantined documents"),
    ("hq.revoked", "失効した端末", "Revoked nodes"),
    ("hq.break_glass", "ブレークグラス利用の確認", "Break-glass use to review"),
    ("hq.no_break_glass", "ブレークグラスの利用はありません", "No break-glass use"),
    ("hq.find", "人を探す", "Find a person"),
    ("hq.updated", "更新", "Updated"),
    ("mail.pending", "送信待ち", "pending"),
    ("mail.sent", "送信済み", "sent"),
    ("mail.failed", "失敗", "failed"),
    ("mail.indeterminate", "不確定", "indeterminate"),
    ("col.operator", "担当者", "Operator"),
    ("col.node", "端末", "Node"),
    ("col.time", "時刻", "Time"),
    ("col.record", "記録", "Record"),
    ("col.reason", "理由", "Reason"),
    ("col.status", "状態", "Status"),
    ("col.count", "件数", "Count"),
    ("yes", "はい", "yes"),
    ("no", "いいえ", "no"),
];

/// The word for `key` in `lang`; the key itself if missing (a test checks
/// every key the pages use exists).
pub fn t(lang: Lang, key: &str) -> &'static str {
    match STRINGS.iter().find(|(k, _, _)| *k == key) {
        Some((_, ja, en)) => match lang {
            Lang::Ja => ja,
            Lang::En => en,
        },
        None => {
            debug_assert!(false, "missing i18n key {key}");
            "?"
        }
    }
}

/// The word for `key`, if the table has it.
pub fn lookup(lang: Lang, key: &str) -> Option<&'static str> {
    STRINGS
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, ja, en)| match lang {
            Lang::Ja => *ja,
            Lang::En => *en,
        })
}

/// The whole table in one language, as JSON for the page's script.
pub fn dictionary(lang: Lang) -> String {
    let mut m = Map::new();
    for (k, ja, en) in STRINGS {
        let v = match lang {
            Lang::Ja => ja,
            Lang::En => en,
        };
        m.insert((*k).to_string(), Value::String((*v).to_string()));
    }
    Value::Object(m).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_both_languages_present() {
        let mut seen = std::collections::BTreeSet::new();
        for (k, ja, en) in STRINGS {
            assert!(seen.insert(*k), "duplicate key {k}");
            assert!(!ja.is_empty() && !en.is_empty(), "{k}");
        }
    }

    /// Every `T("key")` and `data-t="key"` in the script exists.
    #[test]
    fn script_keys_exist() {
        let js = include_str!("assets/app.js");
        let mut missing = Vec::new();
        for part in js.split("T(\"").skip(1) {
            let key = &part[..part.find('"').unwrap()];
            if !STRINGS.iter().any(|(k, _, _)| *k == key) {
                missing.push(key.to_string());
            }
        }
        assert!(missing.is_empty(), "missing keys: {missing:?}");
    }
}
