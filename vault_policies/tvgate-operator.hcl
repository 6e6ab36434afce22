# tvgate-operator.hcl: what an operator needs to set up tvgate in Vault and rotate its
# transit key. It cannot encrypt or decrypt: an operator never sees a provider key.
# Rendered by `tvgate vault policy operator` for mount "transit" and transit key "tvgate".
#
# Note: whoever may create secret_ids for role "tvgate" can log in as the gateway, and
# whoever may write policy "tvgate" can widen it. Give this policy to the people who
# run the gateway, not to every Vault user.

# Enable the transit engine (tvgate vault setup) and check that it is one.
path "sys/mounts/transit" { capabilities = ["create", "read", "update"] }

# Create the derived key, read its versions, rotate it, retire old versions
# (min_decryption_version) once `tvgate keys rewrap` has moved every ciphertext.
path "transit/keys/tvgate" { capabilities = ["create", "read", "update"] }
path "transit/keys/tvgate/rotate" { capabilities = ["update"] }
path "transit/keys/tvgate/config" { capabilities = ["update"] }

# Write the gateway's policy; read (not change) this one.
path "sys/policies/acl/tvgate" { capabilities = ["create", "read", "update"] }
path "sys/policies/acl/tvgate-operator" { capabilities = ["read"] }

# Enable AppRole (enabling an auth method needs sudo), manage role "tvgate", read its
# role_id, issue secret_ids, and destroy one that leaked.
path "sys/auth" { capabilities = ["read"] }
path "sys/auth/approle" { capabilities = ["create", "read", "update", "sudo"] }
path "auth/approle/role/tvgate" { capabilities = ["create", "read", "update"] }
path "auth/approle/role/tvgate/role-id" { capabilities = ["read"] }
path "auth/approle/role/tvgate/secret-id" { capabilities = ["update"] }
path "auth/approle/role/tvgate/secret-id-accessor/destroy" { capabilities = ["update"] }
