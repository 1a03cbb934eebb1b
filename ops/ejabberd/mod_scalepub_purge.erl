%% Removes an anonymous account when its last session ends, and with it the account's pubsub
%% subscriptions on every host's pubsub service.
%%
%% Why, in ejabberd 23.01 (two faults; docs/security.md, "Dead anonymous subscriptions"):
%% 1. ejabberd_auth_anonymous:unregister_connection/3 runs the remove_user hook only when the
%%    session's auth_module is ejabberd_auth_anonymous, but a SASL ANONYMOUS login records
%%    auth_module `anonymous` (xmpp 1.6.1, xmpp_sasl_anonymous:mech_step/2), so remove_user
%%    never ran for such an account: nothing of it was ever cleaned.
%% 2. mod_pubsub:remove_user/2 cleans only host(LServer), the pubsub service of the anonymous
%%    domain itself; scalepub's nodes live on the publisher domain's service.
%% So every anonymous subscriber that went away stayed subscribed and was routed every later
%% item. This module runs remove_user for such sessions (as ejabberd_auth_anonymous means to)
%% and, on remove_user of any host, unsubscribes the account on the other hosts' services too.
%%
%% Built by ops/stack (erlc, no ejabberd headers needed) into the stack's beams dir, which
%% ejabberdctl puts on the node's code path (-pa in ejabberdctl.cfg's ERL_OPTIONS).
-module(mod_scalepub_purge).
%% A gen_mod module (no -behaviour attribute: erlc here does not see ejabberd's beams).

-export([start/2, stop/1, reload/3, depends/2, mod_options/1, mod_opt_type/1, mod_doc/0]).
-export([remove_user/2, unregister_connection/3, sweep/0]).

%% After mod_pubsub's own remove_user (50): independent of it, but its work comes first.
-define(PRIORITY, 60).
%% The auth_module a SASL ANONYMOUS session records (see fault 1 above).
-define(SASL_ANONYMOUS, anonymous).

start(Host, _Opts) ->
    ejabberd_hooks:add(ejabberd_started, ?MODULE, sweep, 100),
    ejabberd_hooks:add(sm_remove_connection_hook, Host, ?MODULE, unregister_connection, 100),
    ejabberd_hooks:add(remove_user, Host, ?MODULE, remove_user, ?PRIORITY).

stop(Host) ->
    ejabberd_hooks:delete(ejabberd_started, ?MODULE, sweep, 100),
    ejabberd_hooks:delete(sm_remove_connection_hook, Host, ?MODULE, unregister_connection, 100),
    ejabberd_hooks:delete(remove_user, Host, ?MODULE, remove_user, ?PRIORITY).

reload(_Host, _NewOpts, _OldOpts) -> ok.

depends(_Host, _Opts) -> [{mod_pubsub, hard}].

mod_options(_Host) -> [].

mod_opt_type(_) -> econf:any().

mod_doc() -> #{desc => ["Removes ended SASL ANONYMOUS accounts and their subscriptions on every pubsub service."]}.

%% ejabberd_auth_anonymous:unregister_connection/3 for the auth_module it does not recognise.
unregister_connection(_SID, JID, Info) ->
    {LUser, LServer, _} = jid:tolower(JID),
    case proplists:get_value(auth_module, Info) == ?SASL_ANONYMOUS
         andalso ejabberd_sm:get_user_resources(LUser, LServer) == [] of
        true -> ejabberd_hooks:run(remove_user, LServer, [LUser, LServer]);
        false -> ok
    end.

%% At start: accounts whose sessions never ran the hook above (open when ejabberd crashed or
%% was killed, or ended before this module was enabled) still have subscriptions. Remove every
%% account of a SASL ANONYMOUS host that has them and no session now (on any cluster node).
sweep() ->
    lists:foreach(fun sweep/1, [H || H <- ejabberd_option:hosts(),
                                     ejabberd_auth_anonymous:is_sasl_anonymous_enabled(H)]).

sweep(Host) ->
    try
        %% #pubsub_state{stateid = {{User, Host, _}, _}} (pubsub.hrl; mnesia, the default db)
        Users = lists:usort(mnesia:dirty_select(
                              pubsub_state,
                              [{{pubsub_state, {{'$1', Host, '_'}, '_'}, '_', '_', '_', '_'},
                                [], ['$1']}])),
        Gone = [U || U <- Users, ejabberd_sm:get_user_resources(U, Host) == []],
        lists:foreach(fun(U) -> ejabberd_hooks:run(remove_user, Host, [U, Host]) end, Gone),
        logger:notice("mod_scalepub_purge: removed ~B ended anonymous accounts of ~ts",
                      [length(Gone), Host])
    catch Class:Reason ->
        logger:warning("mod_scalepub_purge: start-up sweep of ~ts: ~p:~p", [Host, Class, Reason])
    end.

remove_user(User, Server) ->
    Entity = jid:make(User, Server),
    Own = mod_pubsub:host(jid:nameprep(Server)),
    Services = lists:usort([mod_pubsub:host(H) || H <- ejabberd_option:hosts(),
                                                   gen_mod:is_loaded(H, mod_pubsub)]),
    lists:foreach(fun(Service) -> purge(Service, Entity) end, Services -- [Own]).

purge(Service, Entity) ->
    lists:foreach(fun(Type) -> purge(Service, Type, Entity) end, mod_pubsub:plugins(Service)).

%% A failure here must never break the logout that runs this hook: log it and go on.
purge(Service, Type, Entity) ->
    try mod_pubsub:node_action(Service, Type, get_entity_subscriptions, [Service, Entity]) of
        {result, Subs} ->
            lists:foreach(fun(Sub) -> unsubscribe(Service, Type, Entity, Sub) end, Subs);
        _ ->
            ok
    catch Class:Reason ->
        logger:warning("mod_scalepub_purge: ~ts on ~ts (~ts): ~p:~p",
                       [jid:encode(Entity), Service, Type, Class, Reason])
    end.

%% Node is a #pubsub_node{} record (pubsub.hrl): {pubsub_node, NodeId, Nidx, ...}.
unsubscribe(Service, Type, Entity, {Node, _Sub, _SubId, SubJID}) ->
    Nidx = element(3, Node),
    mod_pubsub:node_action(Service, Type, unsubscribe_node, [Nidx, Entity, SubJID, all]);
unsubscribe(_Service, _Type, _Entity, _Other) ->
    ok.
