//! Test support shared by every crate's tests and benches (feature
//! `testkit`, never in the node binary): synthetic households with stable
//! ids, names and card ids, so that tests across crates speak of the same
//! residents. Deterministic: the same index gives the same household.

use crate::model::{Household, Member};
use crate::text::CardUserId;

/// Household `h{i}` with `members` members `p{i}-{m}`, each with a card
/// (`{i*10+m}` as 13 digits). Ids and card ids stay distinct for m < 10.
pub fn household(i: usize, members: usize) -> Household {
    Household {
        household_id: format!("h{i}"),
        address: format!("新潟県三条市{i}番地"),
        members: (0..members)
            .map(|m| Member {
                person_id: format!("p{i}-{m}"),
                name: format!("山田 {i}-{m}"),
                kana: format!("ヤマダ {i} {m}"),
                birth_date: "1950-04-01".into(),
                card_user_id: Some(
                    CardUserId::parse(&format!("{:013}", i * 10 + m)).expect("13 digits"),
                ),
            })
            .collect(),
    }
}

/// `n` one-person households without cards, ids zero-padded to 7 digits
/// (`h0000042` / `p0000042`), all at `address`: bulk registries for
/// benchmarks, where card lookups are not the point.
pub fn bulk_household(i: usize, address: &str) -> Household {
    Household {
        household_id: format!("h{i:07}"),
        address: address.to_string(),
        members: vec![Member {
            person_id: format!("p{i:07}"),
            name: format!("住民 {i}"),
            kana: format!("ジュウミン {i}"),
            birth_date: "1960-01-01".into(),
            card_user_id: None,
        }],
    }
}

/// A registry CSV in the `kizuna registry import` format: `persons`
/// persons `p{i}`, two per household `h{i/2}`, without cards.
pub fn registry_csv(persons: usize) -> String {
    let mut s = "household_id,address,person_id,name,kana,birth_date,card_user_id\n".to_string();
    for i in 0..persons {
        s.push_str(&format!(
            "h{},三条市旭町{}-1,p{i},山田 {i},ヤマダ {i},1950-04-01,\n",
            i / 2,
            i / 2
        ));
    }
    s
}
