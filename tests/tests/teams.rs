//! Teams and membership: the personal team, creating, listing, switching, updating and
//! deleting teams, members and roles, the last-owner rule, and tenancy (another team's id is a
//! 404 that changes nothing).

use instapod_tests::checks::{assert_timestamp, assert_uuid};
use instapod_tests::ids::unique_slug;
use instapod_tests::{
    ControlPlane, Response, TestUser, login, register_and_login, register_and_login_as, string_field,
};
use serde_json::{Value, json};
use uuid::Uuid;

/// Creates a team owned by `user` and returns it (asserting 201).
async fn create_team(user: &TestUser, name: &str) -> Value {
    let slug = unique_slug("team");
    let team = user
        .client()
        .post_json("/api/teams", &json!({"name": name, "slug": slug}))
        .await
        .json_with_status(201);
    assert_eq!(team["slug"], slug.as_str());
    team
}

async fn list_teams(user: &TestUser) -> Vec<Value> {
    let body = user.client().get_response("/api/teams").await.json_with_status(200);
    body["teams"]
        .as_array()
        .unwrap_or_else(|| panic!("teams list in {body}"))
        .clone()
}

fn find_team<'a>(teams: &'a [Value], id: &str) -> Option<&'a Value> {
    teams.iter().find(|team| team["id"] == id)
}

async fn add_member(actor: &TestUser, team_id: &str, email: &str, role: Option<&str>) -> Response {
    let body = match role {
        Some(role) => json!({"email": email, "role": role}),
        None => json!({"email": email}),
    };
    actor
        .client()
        .post_json(&format!("/api/teams/{team_id}/members"), &body)
        .await
}

async fn members(user: &TestUser, team_id: &str) -> Vec<Value> {
    let body = user
        .client()
        .get_response(&format!("/api/teams/{team_id}/members"))
        .await
        .json_with_status(200);
    body["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members list in {body}"))
        .clone()
}

fn assert_team_shape(team: &Value) {
    assert_uuid(&team["id"], "team.id");
    assert!(team["name"].is_string(), "{team}");
    assert!(team["slug"].is_string(), "{team}");
    assert!(team["personal"].is_boolean(), "{team}");
    assert!(
        matches!(team["role"].as_str(), Some("owner" | "admin" | "member")),
        "{team}"
    );
    assert!(team["member_count"].is_i64(), "{team}");
    assert_timestamp(&team["created_at"], "team.created_at");
    assert!(team["active"].is_boolean(), "{team}");
}

#[tokio::test]
async fn the_personal_team_exists_after_registration() {
    let cp = ControlPlane::start_default().await;
    let user = register_and_login(&cp).await;
    let teams = list_teams(&user).await;
    assert_eq!(teams.len(), 1, "{teams:?}");
    let personal = &teams[0];
    assert_team_shape(personal);
    assert_eq!(personal["id"], user.personal_team_id.as_str());
    assert_eq!(personal["personal"], true);
    assert_eq!(personal["active"], true);
    assert_eq!(personal["role"], "owner");
    assert_eq!(personal["member_count"], 1);

    let fetched = user
        .client()
        .get_response(&format!("/api/teams/{}", user.personal_team_id))
        .await
        .json_with_status(200);
    assert_eq!(&fetched, personal);
    let members = members(&user, &user.personal_team_id).await;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["user_id"], user.user_id.as_str());
    assert_eq!(members[0]["email"], user.email.as_str());
    assert_eq!(members[0]["role"], "owner");
    assert_timestamp(&members[0]["joined_at"], "member.joined_at");
}

#[tokio::test]
async fn create_and_list_teams() {
    let cp = ControlPlane::start_default().await;
    let user = register_and_login(&cp).await;
    let team = create_team(&user, "Acme Web").await;
    assert_team_shape(&team);
    assert_eq!(team["name"], "Acme Web");
    assert_eq!(team["personal"], false);
    assert_eq!(team["role"], "owner");
    assert_eq!(team["member_count"], 1);
    assert_eq!(team["active"], false, "creating a team does not switch to it");

    // Without a slug, one is derived from the name and follows the slug rule.
    let derived = user
        .client()
        .post_json(
            "/api/teams",
            &json!({"name": format!("Derived {}", Uuid::new_v4().simple())}),
        )
        .await
        .json_with_status(201);
    let slug = string_field(&derived, "/slug");
    assert!(
        (3..=30).contains(&slug.len())
            && slug
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !slug.starts_with('-')
            && !slug.ends_with('-'),
        "derived slug {slug:?}"
    );

    let teams = list_teams(&user).await;
    assert_eq!(teams.len(), 3, "{teams:?}");
    for id in [
        user.personal_team_id.as_str(),
        team["id"].as_str().unwrap_or_default(),
        derived["id"].as_str().unwrap_or_default(),
    ] {
        assert!(find_team(&teams, id).is_some(), "{id} missing from {teams:?}");
    }
    let active: Vec<&Value> = teams.iter().filter(|t| t["active"] == true).collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0]["id"], user.personal_team_id.as_str());
}

#[tokio::test]
async fn slugs_are_unique_and_follow_the_rule() {
    let cp = ControlPlane::start_default().await;
    let alice = register_and_login_as(&cp, "alice", false).await;
    let bob = register_and_login_as(&cp, "bob", false).await;
    let team = create_team(&alice, "Taken").await;
    let slug = string_field(&team, "/slug");

    bob.client()
        .post_json("/api/teams", &json!({"name": "Mine", "slug": slug}))
        .await
        .assert_error(409, "slug_taken");
    let bobs = create_team(&bob, "Bob's").await;
    bob.client()
        .put_json(
            &format!("/api/teams/{}", string_field(&bobs, "/id")),
            &json!({"slug": slug}),
        )
        .await
        .assert_error(409, "slug_taken");

    for bad in [
        "ab",
        "-abc",
        "abc-",
        "Abc",
        "a_bc",
        "a bc",
        "abc;rm",
        "abc$(x)",
        "ab\ncd",
        "caf\u{e9}",
        &"a".repeat(31),
    ] {
        alice
            .client()
            .post_json("/api/teams", &json!({"name": "Bad", "slug": bad}))
            .await
            .assert_error(400, "validation_failed");
    }
    for bad_name in [String::new(), "n".repeat(101)] {
        alice
            .client()
            .post_json("/api/teams", &json!({"name": bad_name, "slug": unique_slug("n")}))
            .await
            .assert_error(400, "validation_failed");
    }
    alice
        .client()
        .post_json("/api/teams", &json!({"slug": unique_slug("noname")}))
        .await
        .assert_error(400, "invalid_json");
    alice
        .client()
        .post_json(
            "/api/teams",
            &json!({"name": "x", "slug": unique_slug("x"), "plan": "scale"}),
        )
        .await
        .assert_error(400, "invalid_json");
    // Boundaries that are valid: 3 and 30 characters.
    let random = Uuid::new_v4().simple().to_string();
    for good in [random[..3].to_string(), format!("edge-{}", &random[..25])] {
        alice
            .client()
            .post_json("/api/teams", &json!({"name": "Edge", "slug": good}))
            .await
            .assert_status(201);
    }
    // Only alice's teams exist: none of the refused ones was created.
    assert_eq!(list_teams(&alice).await.len(), 4);
}

#[tokio::test]
async fn switching_sets_the_active_team_of_the_credential_in_use() {
    let cp = ControlPlane::start_default().await;
    let user = register_and_login(&cp).await;
    let other = register_and_login(&cp).await;
    let team = create_team(&user, "Switch target").await;
    let team_id = string_field(&team, "/id");

    let switched = user
        .client()
        .post_json("/api/teams/switch", &json!({"team_id": team_id}))
        .await
        .json_with_status(200);
    assert_eq!(switched["id"], team_id.as_str());
    assert_eq!(switched["active"], true);

    let teams = list_teams(&user).await;
    assert_eq!(find_team(&teams, &team_id).map(|t| &t["active"]), Some(&json!(true)));
    assert_eq!(
        find_team(&teams, &user.personal_team_id).map(|t| &t["active"]),
        Some(&json!(false))
    );
    let me = user.client().get_response("/api/auth/user").await.json_with_status(200);
    assert_eq!(me["active_team_id"], team_id.as_str());

    // Another session of the same user keeps its own active team.
    let second_token = login(&cp, &user.email, &user.password).await;
    let me_elsewhere = cp
        .client()
        .with_token(&second_token)
        .get_response("/api/auth/user")
        .await
        .json_with_status(200);
    assert_eq!(me_elsewhere["active_team_id"], user.personal_team_id.as_str());

    // Switching to a team one is not a member of, or that does not exist: 404, no change.
    other
        .client()
        .post_json("/api/teams/switch", &json!({"team_id": team_id}))
        .await
        .assert_error(404, "not_found");
    user.client()
        .post_json("/api/teams/switch", &json!({"team_id": other.personal_team_id}))
        .await
        .assert_error(404, "not_found");
    user.client()
        .post_json("/api/teams/switch", &json!({"team_id": Uuid::new_v4().to_string()}))
        .await
        .assert_error(404, "not_found");
    let me = user.client().get_response("/api/auth/user").await.json_with_status(200);
    assert_eq!(me["active_team_id"], team_id.as_str());

    user.client()
        .post_json("/api/teams/switch", &json!({"team_id": "not-a-uuid"}))
        .await
        .assert_status(400);
    user.client()
        .post_json("/api/teams/switch", &json!({}))
        .await
        .assert_error(400, "invalid_json");
}

#[tokio::test]
async fn another_teams_id_is_not_found_everywhere() {
    let cp = ControlPlane::start_default().await;
    let owner = register_and_login_as(&cp, "owner", false).await;
    let stranger = register_and_login_as(&cp, "stranger", false).await;
    let team = create_team(&owner, "Private").await;
    let team_id = string_field(&team, "/id");
    let client = stranger.client();

    for id in [
        team_id.clone(),
        owner.personal_team_id.clone(),
        Uuid::new_v4().to_string(),
    ] {
        client
            .get_response(&format!("/api/teams/{id}"))
            .await
            .assert_error(404, "not_found");
        client
            .put_json(&format!("/api/teams/{id}"), &json!({"name": "Hijacked"}))
            .await
            .assert_error(404, "not_found");
        client
            .delete_response(&format!("/api/teams/{id}"))
            .await
            .assert_error(404, "not_found");
        client
            .get_response(&format!("/api/teams/{id}/members"))
            .await
            .assert_error(404, "not_found");
        client
            .post_json(
                &format!("/api/teams/{id}/members"),
                &json!({"email": stranger.email, "role": "owner"}),
            )
            .await
            .assert_error(404, "not_found");
        client
            .delete_response(&format!("/api/teams/{id}/members/{}", owner.user_id))
            .await
            .assert_error(404, "not_found");
        client
            .delete_response(&format!("/api/teams/{id}/members/{}", stranger.user_id))
            .await
            .assert_error(404, "not_found");
    }

    // Nothing changed.
    let after = owner
        .client()
        .get_response(&format!("/api/teams/{team_id}"))
        .await
        .json_with_status(200);
    assert_eq!(after["name"], "Private");
    assert_eq!(after["member_count"], 1);
    assert_eq!(members(&owner, &team_id).await.len(), 1);
    assert!(find_team(&list_teams(&stranger).await, &team_id).is_none());

    // A malformed id names nothing: an error with the JSON body.
    let response = client.get_response("/api/teams/not-a-uuid").await;
    assert!(
        matches!(response.status, 400 | 404),
        "malformed id answered {}",
        response.status
    );
    assert!(response.json()["error"]["code"].is_string(), "{}", response.text());
}

#[tokio::test]
async fn updating_a_team_needs_owner_or_admin() {
    let cp = ControlPlane::start_default().await;
    let owner = register_and_login_as(&cp, "owner", false).await;
    let admin = register_and_login_as(&cp, "admin", false).await;
    let member = register_and_login_as(&cp, "member", false).await;
    let team = create_team(&owner, "Before").await;
    let team_id = string_field(&team, "/id");
    add_member(&owner, &team_id, &admin.email, Some("admin"))
        .await
        .assert_status(201);
    add_member(&owner, &team_id, &member.email, None)
        .await
        .assert_status(201);
    let path = format!("/api/teams/{team_id}");

    let renamed = owner
        .client()
        .put_json(&path, &json!({"name": "After"}))
        .await
        .json_with_status(200);
    assert_eq!(renamed["name"], "After");
    assert_eq!(renamed["slug"], team["slug"]);

    let new_slug = unique_slug("renamed");
    let reslugged = admin
        .client()
        .put_json(&path, &json!({"slug": new_slug}))
        .await
        .json_with_status(200);
    assert_eq!(reslugged["slug"], new_slug.as_str());
    assert_eq!(reslugged["role"], "admin");

    member
        .client()
        .put_json(&path, &json!({"name": "Member was here"}))
        .await
        .assert_error(403, "forbidden");
    owner
        .client()
        .put_json(&path, &json!({"slug": "Not Valid"}))
        .await
        .assert_error(400, "validation_failed");
    owner
        .client()
        .put_json(&path, &json!({"name": ""}))
        .await
        .assert_error(400, "validation_failed");
    owner
        .client()
        .put_json(&path, &json!({"personal": true}))
        .await
        .assert_error(400, "invalid_json");

    let now = member.client().get_response(&path).await.json_with_status(200);
    assert_eq!(now["name"], "After");
    assert_eq!(now["slug"], new_slug.as_str());
    assert_eq!(now["role"], "member");
    assert_eq!(now["member_count"], 3);
}

#[tokio::test]
async fn members_are_managed_by_owners_and_admins() {
    let cp = ControlPlane::start_default().await;
    let owner = register_and_login_as(&cp, "owner", false).await;
    let bob = register_and_login_as(&cp, "bob", false).await;
    let carol = register_and_login_as(&cp, "carol", false).await;
    let dave = register_and_login_as(&cp, "dave", false).await;
    let team = create_team(&owner, "Crew").await;
    let team_id = string_field(&team, "/id");

    let added = add_member(&owner, &team_id, &bob.email, None)
        .await
        .json_with_status(201);
    assert_eq!(added["user_id"], bob.user_id.as_str());
    assert_eq!(added["email"], bob.email.as_str());
    assert_eq!(added["name"], bob.name.as_str());
    assert_eq!(added["role"], "member");
    assert_timestamp(&added["joined_at"], "member.joined_at");

    // The email is normalised like at registration.
    add_member(&owner, &team_id, &format!("  {}  ", bob.email.to_uppercase()), None)
        .await
        .assert_error(409, "already_member");
    add_member(&owner, &team_id, &bob.email, Some("member"))
        .await
        .assert_error(409, "already_member");
    add_member(&owner, &team_id, "nobody-here@example.test", None)
        .await
        .assert_error(404, "not_found");
    add_member(&owner, &team_id, "not an email", None)
        .await
        .assert_error(400, "validation_failed");
    owner
        .client()
        .post_json(
            &format!("/api/teams/{team_id}/members"),
            &json!({"email": carol.email, "role": "superuser"}),
        )
        .await
        .assert_status(400);

    let listed = members(&owner, &team_id).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    // Bob sees the team, with his role.
    let bobs_view = bob
        .client()
        .get_response(&format!("/api/teams/{team_id}"))
        .await
        .json_with_status(200);
    assert_eq!(bobs_view["role"], "member");
    assert_eq!(bobs_view["member_count"], 2);
    assert_eq!(bobs_view["active"], false);
    assert!(find_team(&list_teams(&bob).await, &team_id).is_some());
    assert_eq!(members(&bob, &team_id).await.len(), 2);

    // A member cannot add, remove or delete.
    add_member(&bob, &team_id, &carol.email, None)
        .await
        .assert_error(403, "forbidden");
    bob.client()
        .delete_response(&format!("/api/teams/{team_id}/members/{}", owner.user_id))
        .await
        .assert_error(403, "forbidden");
    bob.client()
        .delete_response(&format!("/api/teams/{team_id}"))
        .await
        .assert_error(403, "forbidden");

    // The owner promotes Bob to admin: 200, role changed.
    let promoted = add_member(&owner, &team_id, &bob.email, Some("admin"))
        .await
        .json_with_status(200);
    assert_eq!(promoted["role"], "admin");

    // An admin adds members, but cannot grant owner, change roles, remove owners or delete.
    add_member(&bob, &team_id, &carol.email, None).await.assert_status(201);
    add_member(&bob, &team_id, &dave.email, Some("owner"))
        .await
        .assert_error(403, "forbidden");
    add_member(&bob, &team_id, &carol.email, Some("admin"))
        .await
        .assert_error(403, "forbidden");
    bob.client()
        .delete_response(&format!("/api/teams/{team_id}/members/{}", owner.user_id))
        .await
        .assert_error(403, "forbidden");
    bob.client()
        .delete_response(&format!("/api/teams/{team_id}"))
        .await
        .assert_error(403, "forbidden");
    // An admin removes a member.
    bob.client()
        .delete_response(&format!("/api/teams/{team_id}/members/{}", carol.user_id))
        .await
        .assert_status(204);
    carol
        .client()
        .get_response(&format!("/api/teams/{team_id}"))
        .await
        .assert_error(404, "not_found");
    // Removing someone who is not a member: 404.
    owner
        .client()
        .delete_response(&format!("/api/teams/{team_id}/members/{}", dave.user_id))
        .await
        .assert_error(404, "not_found");

    let roles: Vec<(String, String)> = members(&owner, &team_id)
        .await
        .iter()
        .map(|m| {
            (
                m["email"].as_str().unwrap_or_default().to_string(),
                m["role"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(roles.len(), 2, "{roles:?}");
    assert!(roles.contains(&(owner.email.clone(), "owner".to_string())));
    assert!(roles.contains(&(bob.email.clone(), "admin".to_string())));
}

#[tokio::test]
async fn the_last_owner_cannot_leave_and_members_can() {
    let cp = ControlPlane::start_default().await;
    let owner = register_and_login_as(&cp, "owner", false).await;
    let member = register_and_login_as(&cp, "member", false).await;
    let co_owner = register_and_login_as(&cp, "coowner", false).await;
    let team = create_team(&owner, "Ownership").await;
    let team_id = string_field(&team, "/id");
    add_member(&owner, &team_id, &member.email, None)
        .await
        .assert_status(201);

    owner
        .client()
        .delete_response(&format!("/api/teams/{team_id}/members/{}", owner.user_id))
        .await
        .assert_error(409, "last_owner");
    add_member(&owner, &team_id, &owner.email, Some("admin"))
        .await
        .assert_error(409, "last_owner");
    assert_eq!(
        owner
            .client()
            .get_response(&format!("/api/teams/{team_id}"))
            .await
            .json_with_status(200)["role"],
        "owner"
    );

    // A member leaves on their own.
    member
        .client()
        .delete_response(&format!("/api/teams/{team_id}/members/{}", member.user_id))
        .await
        .assert_status(204);
    member
        .client()
        .get_response(&format!("/api/teams/{team_id}"))
        .await
        .assert_error(404, "not_found");

    // With a second owner, the first may leave; then the second is the last one.
    add_member(&owner, &team_id, &co_owner.email, Some("owner"))
        .await
        .assert_status(201);
    owner
        .client()
        .delete_response(&format!("/api/teams/{team_id}/members/{}", owner.user_id))
        .await
        .assert_status(204);
    owner
        .client()
        .get_response(&format!("/api/teams/{team_id}"))
        .await
        .assert_error(404, "not_found");
    co_owner
        .client()
        .delete_response(&format!("/api/teams/{team_id}/members/{}", co_owner.user_id))
        .await
        .assert_error(409, "last_owner");
    let left = members(&co_owner, &team_id).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["role"], "owner");
}

#[tokio::test]
async fn personal_teams_and_teams_with_pods_cannot_be_deleted() {
    let cp = ControlPlane::start_default().await;
    let owner = register_and_login(&cp).await;
    owner
        .client()
        .delete_response(&format!("/api/teams/{}", owner.personal_team_id))
        .await
        .assert_error(409, "personal_team");

    let team = create_team(&owner, "Has pods").await;
    let team_id = string_field(&team, "/id");
    let db = cp.db().await;
    db.execute(
        "INSERT INTO pods (team_id, name) VALUES ($1::text::uuid, 'web')",
        &[&team_id],
    )
    .await
    .expect("insert a pod row");
    owner
        .client()
        .delete_response(&format!("/api/teams/{team_id}"))
        .await
        .assert_error(409, "team_has_resources");
    owner
        .client()
        .get_response(&format!("/api/teams/{team_id}"))
        .await
        .assert_status(200);

    db.execute("DELETE FROM pods WHERE team_id = $1::text::uuid", &[&team_id])
        .await
        .expect("delete the pod row");
    owner
        .client()
        .delete_response(&format!("/api/teams/{team_id}"))
        .await
        .assert_status(204);
    owner
        .client()
        .get_response(&format!("/api/teams/{team_id}"))
        .await
        .assert_error(404, "not_found");
    assert!(find_team(&list_teams(&owner).await, &team_id).is_none());
}

#[tokio::test]
async fn deleting_the_active_team_falls_back_to_the_personal_team() {
    let cp = ControlPlane::start_default().await;
    let owner = register_and_login_as(&cp, "owner", false).await;
    let member = register_and_login_as(&cp, "member", false).await;
    let team = create_team(&owner, "Doomed").await;
    let team_id = string_field(&team, "/id");
    add_member(&owner, &team_id, &member.email, None)
        .await
        .assert_status(201);
    for user in [&owner, &member] {
        user.client()
            .post_json("/api/teams/switch", &json!({"team_id": team_id}))
            .await
            .assert_status(200);
    }

    owner
        .client()
        .delete_response(&format!("/api/teams/{team_id}"))
        .await
        .assert_status(204);

    for user in [&owner, &member] {
        let me = user.client().get_response("/api/auth/user").await.json_with_status(200);
        assert_eq!(me["active_team_id"], user.personal_team_id.as_str());
        let teams = list_teams(user).await;
        assert_eq!(teams.len(), 1, "{teams:?}");
        assert_eq!(teams[0]["id"], user.personal_team_id.as_str());
        assert_eq!(teams[0]["active"], true);
    }
}

#[tokio::test]
async fn a_removed_members_active_team_falls_back_to_the_personal_team() {
    let cp = ControlPlane::start_default().await;
    let owner = register_and_login_as(&cp, "owner", false).await;
    let member = register_and_login_as(&cp, "member", false).await;
    let team = create_team(&owner, "Kicks").await;
    let team_id = string_field(&team, "/id");
    add_member(&owner, &team_id, &member.email, None)
        .await
        .assert_status(201);
    member
        .client()
        .post_json("/api/teams/switch", &json!({"team_id": team_id}))
        .await
        .assert_status(200);
    owner
        .client()
        .delete_response(&format!("/api/teams/{team_id}/members/{}", member.user_id))
        .await
        .assert_status(204);
    let me = member
        .client()
        .get_response("/api/auth/user")
        .await
        .json_with_status(200);
    assert_eq!(me["active_team_id"], member.personal_team_id.as_str());
    let teams = list_teams(&member).await;
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0]["active"], true);
}

#[tokio::test]
async fn team_endpoints_require_authentication() {
    let cp = ControlPlane::start_default().await;
    let owner = register_and_login(&cp).await;
    let id = owner.personal_team_id.clone();
    let uid = owner.user_id.clone();
    let anonymous = cp.client();
    let responses = vec![
        anonymous.get_response("/api/teams").await,
        anonymous
            .post_json("/api/teams", &json!({"name": "x", "slug": unique_slug("anon")}))
            .await,
        anonymous.post_json("/api/teams/switch", &json!({"team_id": id})).await,
        anonymous.get_response(&format!("/api/teams/{id}")).await,
        anonymous
            .put_json(&format!("/api/teams/{id}"), &json!({"name": "x"}))
            .await,
        anonymous.delete_response(&format!("/api/teams/{id}")).await,
        anonymous.get_response(&format!("/api/teams/{id}/members")).await,
        anonymous
            .post_json(&format!("/api/teams/{id}/members"), &json!({"email": owner.email}))
            .await,
        anonymous
            .delete_response(&format!("/api/teams/{id}/members/{uid}"))
            .await,
    ];
    for response in responses {
        response.assert_error(401, "unauthorized");
    }
    // A revoked token is no better than none.
    owner.client().post("/api/auth/logout").send().await.assert_status(204);
    owner
        .client()
        .get_response("/api/teams")
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn team_request_bodies_follow_the_json_rules() {
    let cp = ControlPlane::start_default().await;
    let user = register_and_login(&cp).await;
    let client = user.client();
    client
        .post("/api/teams")
        .raw_body("text/plain", r#"{"name": "Plain"}"#)
        .send()
        .await
        .assert_error(415, "unsupported_media_type");
    client
        .post("/api/teams")
        .raw_body("application/json", "{\"name\": ")
        .send()
        .await
        .assert_error(400, "invalid_json");
    let huge = json!({"name": "n".repeat(100 * 1024)}).to_string();
    client
        .post("/api/teams")
        .raw_body("application/json", huge)
        .send()
        .await
        .assert_error(413, "payload_too_large");
    client
        .put(&format!("/api/teams/{}", user.personal_team_id))
        .raw_body("text/plain", r#"{"name": "Plain"}"#)
        .send()
        .await
        .assert_error(415, "unsupported_media_type");
    assert_eq!(list_teams(&user).await.len(), 1, "nothing was created");
}

#[tokio::test]
async fn concurrent_creations_of_one_slug_create_one_team() {
    let cp = ControlPlane::start_default().await;
    let alice = register_and_login_as(&cp, "alice", false).await;
    let bob = register_and_login_as(&cp, "bob", false).await;
    let slug = unique_slug("race");
    let body = json!({"name": "Race", "slug": slug});
    let (alice_client, bob_client) = (alice.client(), bob.client());
    let (a1, a2, b1, b2) = tokio::join!(
        alice_client.post_json("/api/teams", &body),
        alice_client.post_json("/api/teams", &body),
        bob_client.post_json("/api/teams", &body),
        bob_client.post_json("/api/teams", &body),
    );
    let mut created = 0;
    for response in [&a1, &a2, &b1, &b2] {
        if response.status == 201 {
            created += 1;
        } else {
            response.assert_error(409, "slug_taken");
        }
    }
    assert_eq!(created, 1, "exactly one team gets the slug");
}

#[tokio::test]
async fn two_owners_leaving_at_once_leave_one_owner() {
    let cp = ControlPlane::start_default().await;
    let first = register_and_login_as(&cp, "first", false).await;
    let second = register_and_login_as(&cp, "second", false).await;
    for round in 0..5 {
        let team = create_team(&first, &format!("Race {round}")).await;
        let team_id = string_field(&team, "/id");
        add_member(&first, &team_id, &second.email, Some("owner"))
            .await
            .assert_status(201);
        let first_leaves = format!("/api/teams/{team_id}/members/{}", first.user_id);
        let second_leaves = format!("/api/teams/{team_id}/members/{}", second.user_id);
        let (first_client, second_client) = (first.client(), second.client());
        let (a, b) = tokio::join!(
            first_client.delete_response(&first_leaves),
            second_client.delete_response(&second_leaves),
        );
        let statuses = [a.status, b.status];
        assert!(
            statuses.contains(&204) && statuses.contains(&409),
            "round {round}: one leaves, the other is the last owner; got {statuses:?} ({}, {})",
            a.text(),
            b.text()
        );
        for response in [&a, &b] {
            if response.status == 409 {
                response.assert_error(409, "last_owner");
            }
        }
        let db = cp.db().await;
        let owners: i64 = db
            .query_one(
                "SELECT count(*) FROM team_members WHERE team_id = $1::text::uuid AND role = 'owner'",
                &[&team_id],
            )
            .await
            .expect("count owners")
            .get(0);
        assert_eq!(owners, 1, "round {round}");
    }
}
